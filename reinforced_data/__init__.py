"""Reinforced datasets: the embedded shapes corpus, input sources, DataCompDR augmentation records, `build-data`,
the training-side readers and `--verify`.

The shard layout is a superset of Apple's DataCompDR (MobileCLIP, Vasu et al. CVPR'24; apple/ml-mobileclip,
apple/ml-mobileclip-dr), see `schema.py`. Contracts: docs/DESIGN.md "reinforced_data". webdataset and `teachers`
are imported lazily, inside the functions that need them.
"""

from reinforced_data.augment import (
    OP_NAMES,
    AugmentCfg,
    ImageDecodeError,
    center_view,
    decode_image,
    decode_param_aug,
    parse_record,
    record_rng,
    replay,
    sample_record,
    to_uint8_tensor,
)
from reinforced_data.build import BuildArgs, build_data, dist_env, rebuild_manifest, shard_name
from reinforced_data.reader import (
    ReinforcedDataError,
    collate,
    dataset_info,
    image_text_pipeline,
    reinforced_pipeline,
    shard_urls,
)
from reinforced_data.schema import SCHEMA_VERSION, split_embeddings, teacher_slices
from reinforced_data.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    ZEROSHOT_TEMPLATES,
    CorpusCfg,
    ensure_shapes_corpus,
    render_scene,
    shapes_classes,
    write_shapes_corpus,
)
from reinforced_data.sources import InputShard, RawSample, iter_samples, load_captions, resolve_inputs
from reinforced_data.verify import verify_dataset

__all__ = [
    "COLOURS",
    "OP_NAMES",
    "SCHEMA_VERSION",
    "SHAPES",
    "SIZES",
    "ZEROSHOT_TEMPLATES",
    "AugmentCfg",
    "BuildArgs",
    "CorpusCfg",
    "ImageDecodeError",
    "InputShard",
    "RawSample",
    "ReinforcedDataError",
    "build_data",
    "center_view",
    "collate",
    "dataset_info",
    "decode_image",
    "decode_param_aug",
    "dist_env",
    "image_text_pipeline",
    "iter_samples",
    "load_captions",
    "parse_record",
    "rebuild_manifest",
    "record_rng",
    "reinforced_pipeline",
    "render_scene",
    "replay",
    "resolve_inputs",
    "sample_record",
    "shapes_classes",
    "shard_name",
    "shard_urls",
    "split_embeddings",
    "teacher_slices",
    "to_uint8_tensor",
    "verify_dataset",
    "ensure_shapes_corpus",
    "write_shapes_corpus",
]
