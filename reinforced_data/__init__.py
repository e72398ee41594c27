"""Reinforced datasets: build them (`build-data`), read them for training, and check them (`--verify`).

Also the embedded shapes corpus, the input sources and the DataCompDR augmentation records.

The shard layout is a superset of Apple's DataCompDR (MobileCLIP, Vasu et al. CVPR'24; apple/ml-mobileclip,
apple/ml-mobileclip-dr), see `schema.py`. Contracts: docs/DESIGN.md "reinforced_data". Tar grouping and image
decoding are the shared helpers of `mcd_common.tars` and `mcd_common.images` (re-exported here where public).
"""

from mcd_common.images import ImageDecodeError, center_view, decode_image, to_uint8_tensor
from reinforced_data.augment import (
    DATACOMPDR_LAYOUT,
    OP_NAMES,
    AugmentCfg,
    Record,
    RecordLayout,
    decode_param_aug,
    decode_record,
    record_rng,
    replay,
    sample_record,
)
from reinforced_data.build import BuildArgs, InputArgs, build_data, dist_env, rebuild_manifest, shard_name
from reinforced_data.reader import (
    ImageTextDataset,
    ReinforcedDataError,
    ReinforcedDataset,
    ReinforcedOptions,
    collate,
    image_text_sample,
    reinforced_sample,
)
from reinforced_data.schema import SCHEMA_VERSION, split_embeddings, teacher_slices
from reinforced_data.shapes import (
    COLOURS,
    DEFAULT_CORPUS_DIR,
    SHAPES,
    SIZES,
    ZEROSHOT_TEMPLATES,
    CorpusCfg,
    default_corpus,
    ensure_shapes_corpus,
    render_scene,
    shapes_classes,
    write_shapes_corpus,
)
from reinforced_data.sources import InputShard, InputStats, RawSample, iter_samples, load_captions, resolve_inputs
from reinforced_data.verify import verify_dataset

__all__ = [
    "COLOURS",
    "DATACOMPDR_LAYOUT",
    "DEFAULT_CORPUS_DIR",
    "OP_NAMES",
    "SCHEMA_VERSION",
    "SHAPES",
    "SIZES",
    "ZEROSHOT_TEMPLATES",
    "AugmentCfg",
    "BuildArgs",
    "CorpusCfg",
    "ImageDecodeError",
    "ImageTextDataset",
    "InputArgs",
    "InputShard",
    "InputStats",
    "RawSample",
    "Record",
    "RecordLayout",
    "ReinforcedDataError",
    "ReinforcedDataset",
    "ReinforcedOptions",
    "build_data",
    "center_view",
    "collate",
    "decode_image",
    "decode_param_aug",
    "decode_record",
    "default_corpus",
    "dist_env",
    "ensure_shapes_corpus",
    "image_text_sample",
    "iter_samples",
    "load_captions",
    "rebuild_manifest",
    "record_rng",
    "reinforced_sample",
    "render_scene",
    "replay",
    "resolve_inputs",
    "sample_record",
    "shapes_classes",
    "shard_name",
    "split_embeddings",
    "teacher_slices",
    "to_uint8_tensor",
    "verify_dataset",
    "write_shapes_corpus",
]
