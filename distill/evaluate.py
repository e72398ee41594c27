"""`distill eval`: zero-shot classification and image<->text retrieval for students and teachers.

Zero-shot follows CLIP (Radford et al. 2021): one classifier row per class = the normalised mean of the
normalised prompt embeddings ("prompt ensembling"); top-1 over an image-folder dataset (CIFAR-10 layout).
Retrieval reports Recall@1/5/10 in both directions over an image-caption set with several captions per image
(Flickr8k test: 1,000 images, 5,000 captions); an image->text hit is any of the image's own captions in the top K.

An image that cannot be decoded is left out of the metrics and counted (`zeroshot_skipped`, `retrieval_skipped` in
the results, with the first files named), never fatal. A retrieval set that ships split files (`splits/*.txt`, as
flickr8k) evaluated without `--val.split_file` is evaluated on every image, training images included:
that is warned about, and the results record the split used (`retrieval_split`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path

import braceexpand
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from distill.args import EvalArgs
from mcd_common.deprecation import renamed_kwargs
from mcd_common.errors import UsageError
from mcd_common.files import atomic_write_json
from mcd_common.images import ImageDecodeError, eval_view
from mcd_common.tars import MemberRef, TarReader, index_tar
from reinforced_data.shapes import default_corpus
from students import CLIPStudent, create_student, load_student
from teachers import Teacher, TeacherEnsemble, create_teacher

_logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_TEMPLATES",
    "DEPRECATED_FLAGS",
    "CaptionSet",
    "ImageFolderSet",
    "collate_images",
    "evaluate",
    "format_results",
    "load_image",
    "retrieval_metrics",
    "zeroshot_classifier",
]

# NOTE: the old spellings (eval's sets were a group named `data`, train's validation sets `val`), accepted for one
# release by distill.cli (flags and --config keys); `evaluate(data=...)` by `renamed_kwargs`.
DEPRECATED_FLAGS: dict[str, str] = {
    **{f"--data.{f.name}": f"--val.{f.name}" for f in fields(EvalArgs)},
    "--data.retrieval_captions": "--val.captions",
    "--data.retrieval_split_file": "--val.split_file",
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # tar members holding the image, in order of preference
_MAX_LISTED = 20  # unreadable images named in the results; the count is always complete
# A short subset of CLIP's ImageNet prompt ensemble, used when a dataset brings no templates of its own.
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
)


def zeroshot_classifier(
    encode_texts: Callable[[list[str]], Tensor], classnames: list[str], templates: Iterable[str]
) -> Tensor:
    """Class weights `[D, C]`: per class, the normalised mean of its normalised prompt embeddings."""
    templates = list(templates)
    rows = []
    for name in classnames:
        feats = F.normalize(encode_texts([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(feats.mean(0), dim=-1))
    return torch.stack(rows, dim=1)


def retrieval_metrics(
    image_features: Tensor, text_features: Tensor, text_owner: Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K both ways.

    Args:
        image_features: `[N, D]` normalised image embeddings.
        text_features: `[M, D]` normalised caption embeddings.
        text_owner: `[M]` index of each caption's image.
        ks: The K values.

    Returns:
        `{"i2t_R@K": %, "t2i_R@K": %}` in percent.
    """
    sims = image_features.float() @ text_features.float().T  # [N, M]
    n = sims.shape[0]
    out = {}
    text_owner = text_owner.to(sims.device)
    # Image -> text: the rank of the best-ranked caption that belongs to the image.
    order = sims.argsort(dim=1, descending=True)  # [N, M]
    own = text_owner[order] == torch.arange(n, device=sims.device)[:, None]
    first_hit = own.float().argmax(dim=1)
    # Text -> image: the rank of the caption's own image.
    t_order = sims.T.argsort(dim=1, descending=True)  # [M, N]
    t_rank = (t_order == text_owner[:, None]).float().argmax(dim=1)
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float((first_hit < k).float().mean())
        out[f"t2i_R@{k}"] = 100.0 * float((t_rank < k).float().mean())
    return out


def load_image(data: bytes | str | Path, image_size: int, interpolation: str = "bicubic") -> Tensor:
    """Image bytes or a file -> uint8 `[3, S, S]`: the training decoder, then open_clip's eval view.

    Uses `mcd_common.images.eval_view`, so an RGBA, palette or 16-bit image is the same picture as in training.
    """
    return eval_view(data if isinstance(data, bytes) else Path(data).read_bytes(), image_size, interpolation)


class ImageFolderSet(Dataset):
    """`root/<class name>/*.jpg` (CIFAR-10 test layout); class names are folder names with `_` as spaces.

    An item is `{"image", "label", "path"}`; an image that does not decode gives `image` None (and `error`):
    `collate_images` drops it and lists it under `skipped`.

    Raises:
        UsageError: When `root` is not a directory of class folders with images (e.g. the dataset root holding
            `train/` and `test/` instead of `test/` itself).
    """

    def __init__(
        self, root: str | Path, image_size: int, interpolation: str = "bicubic", max_images: int | None = None
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UsageError(f"zero-shot set {root} is not a directory of class folders (root/<class>/*.jpg)")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise UsageError(f"zero-shot set {root} has no class folders (root/<class>/*.jpg)")
        self.classes = [p.name.replace("_", " ") for p in folders]
        self.items = [
            (f, c) for c, d in enumerate(folders) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.items:
            _no_images(root, folders)
        if max_images is not None and len(self.items) > max_images:
            # Keep class balance when capping: a fixed-stride subsample of the sorted list.
            stride = len(self.items) / max_images
            self.items = [self.items[int(i * stride)] for i in range(max_images)]
        self.image_size, self.interpolation = image_size, interpolation
        self.templates = _templates_near(root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, label = self.items[i]
        try:
            image = load_image(path, self.image_size, self.interpolation)
        except (ImageDecodeError, OSError) as exc:
            return {"image": None, "label": label, "path": str(path), "error": str(exc)}
        return {"image": image, "label": label, "path": str(path)}


def _no_images(root: Path, folders: list[Path]) -> None:
    """Raise the right message for a zero-shot folder whose class folders hold no image."""
    nested = [
        d.name
        for d in folders
        if any(sub.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in sub.iterdir()) for sub in d.iterdir())
    ]
    if nested:
        pick = "test" if "test" in nested else nested[0]
        raise UsageError(
            f"zero-shot set {root} holds splits ({', '.join(nested)}), not class folders of images: pass "
            f"--val.zeroshot {root / pick}"
        )
    raise UsageError(
        f"zero-shot set {root}: its {len(folders)} class folders hold no image ({', '.join(IMAGE_EXTENSIONS)})"
    )


def collate_images(batch: list[dict]) -> dict:
    """Stack images (`[B, 3, S, S]` uint8) and labels; items whose image did not decode are dropped and their
    paths listed under `skipped`."""
    ok = [b for b in batch if b["image"] is not None]
    images = torch.stack([b["image"] for b in ok]) if ok else torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    return {
        "image": images,
        "label": torch.tensor([b["label"] for b in ok], dtype=torch.long),
        "skipped": [f"{b['path']}: {b['error']}" for b in batch if b["image"] is None],
    }


def _templates_near(root: Path) -> list[str] | None:
    """Prompt templates from a `corpus.json` next to the set (the embedded corpus ships its own)."""
    for cand in (root / "corpus.json", root.parent / "corpus.json"):
        if cand.is_file():
            return list(json.loads(cand.read_text()).get("templates") or []) or None
    return None


class CaptionSet(Dataset):
    """Images with several captions each, for retrieval.

    Sources: a directory with `images/` and `captions.csv` (Flickr8k layout, optional `split_file`), an image
    folder with an explicit captions CSV (`image,caption`) or JSONL (`{"image", "caption"}`), or webdataset tar
    shards whose samples carry `json` with a `captions` list (else the single `txt`).
    """

    def __init__(
        self,
        source: str | Path,
        image_size: int,
        interpolation: str = "bicubic",
        captions: str | Path | None = None,
        split_file: str | Path | None = None,
        max_images: int | None = None,
    ) -> None:
        self.image_size, self.interpolation = image_size, interpolation
        self.split = _split_used(source, captions, split_file)
        """The split file evaluated, or `all` (every image of the set)."""
        self.items: list[tuple[Path | MemberRef, list[str]]] = _caption_items(source, captions, split_file)
        if not self.items:
            raise UsageError(f"--val.retrieval {source}: holds no image with a caption")
        if max_images is not None:
            self.items = self.items[:max_images]
        self._reader = TarReader()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, caps = self.items[i]
        where = f"{image.path}@{image.offset}" if isinstance(image, MemberRef) else str(image)
        try:
            data = self._reader.read(image) if isinstance(image, MemberRef) else image.read_bytes()
            pixels = load_image(data, self.image_size, self.interpolation)
        except (ImageDecodeError, OSError) as exc:
            return {"image": None, "captions": caps, "path": where, "error": str(exc)}
        return {"image": pixels, "captions": caps, "path": where}


_ImageItem = tuple[Path | MemberRef, list[str]]


def _split_used(source: str | Path, captions: str | Path | None, split_file: str | Path | None) -> str:
    """`split_file`, or `all`; warns when the set ships split files but none was given (training images would be
    evaluated too)."""
    if split_file is not None:
        return str(split_file)
    src = Path(str(source)).expanduser()
    roots = [src] + ([Path(captions).expanduser().parent] if captions is not None else [])
    splits = sorted({str(p) for r in roots if r.is_dir() for p in (r / "splits").glob("*.txt")})
    if splits:
        test = next((p for p in splits if Path(p).stem == "test"), splits[0])
        _logger.warning(
            "retrieval set %s has split files (%s) but no --val.split_file was given: every image is "
            "evaluated, training images included; pass --val.split_file %s for a held-out score",
            source,
            ", ".join(Path(p).name for p in splits),
            test,
        )
    return "all"


def _caption_items(source: str | Path, captions: str | Path | None, split_file: str | Path | None) -> list[_ImageItem]:
    src = Path(str(source)).expanduser()
    if src.is_dir() and captions is None:
        for name in ("captions.csv", "captions.jsonl"):
            if (src / name).is_file():
                captions = src / name
                break
        if captions is not None and (src / "images").is_dir():
            src = src / "images"
    if captions is not None:
        return _folder_items(src, Path(captions), split_file)
    return _tar_items(str(source))


def _folder_items(folder: Path, captions: Path, split_file: str | Path | None) -> list[_ImageItem]:
    by_image: dict[str, list[str]] = {}
    if captions.suffix == ".jsonl":
        for line in captions.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                by_image.setdefault(rec["image"], []).append(rec["caption"])
    else:
        with open(captions, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                by_image.setdefault(row["image"], []).append(row["caption"])
    keep = None
    if split_file is not None:
        keep = [ln.strip() for ln in Path(split_file).read_text().splitlines() if ln.strip()]
    names = keep if keep is not None else sorted(by_image)
    return [(folder / n, by_image[n]) for n in names if n in by_image and (folder / n).is_file()]


def _tar_items(pattern: str) -> list[_ImageItem]:
    """`(image member, captions)` per sample of webdataset tars (grouped by `mcd_common.tars`).

    Only the small caption members are read here; images are read by offset when the item is loaded.
    """
    paths: list[Path] = []
    for p in braceexpand.braceexpand(pattern):
        pp = Path(p).expanduser()
        paths.extend(sorted(pp.glob("*.tar")) if pp.is_dir() else [pp])
    items: list[_ImageItem] = []
    with TarReader() as reader:
        for path in paths:
            for sample in index_tar(path):
                where = {ext: (offset, size) for ext, offset, size in sample.members}
                image = next((where[k] for k in _TAR_IMAGE_KEYS if k in where), None)
                texts = reader.read_sample(path, sample, exts=("json", "txt"))
                caps = json.loads(texts["json"]).get("captions") if "json" in texts else None
                if not caps and "txt" in texts:
                    caps = [texts["txt"].decode("utf-8", errors="replace")]
                if image is not None and caps:
                    items.append((MemberRef(str(path), *image), list(caps)))
    return items


def collate_captions(batch: list[dict], tokenize: Callable[[list[str]], Tensor] | None = None) -> dict:
    """Stack images; flatten captions with `owner` = index of their image in the batch (and tokens if asked).

    Items whose image did not decode are dropped with their captions and listed under `skipped`.
    """
    ok = [b for b in batch if b["image"] is not None]
    captions = [c for b in ok for c in b["captions"]]
    owner = torch.tensor([i for i, b in enumerate(ok) for _ in b["captions"]], dtype=torch.long)
    images = torch.stack([b["image"] for b in ok]) if ok else torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    out = {
        "image": images,
        "captions": captions,
        "owner": owner,
        "skipped": [f"{b['path']}: {b['error']}" for b in batch if b["image"] is None],
    }
    if tokenize is not None:
        out["text"] = tokenize(captions)
    return out


def _skip_report(prefix: str, skipped: list[str]) -> dict:
    if skipped:
        _logger.warning(
            "%s: %d image(s) could not be decoded and were left out, e.g. %s", prefix, len(skipped), skipped[0]
        )
    return {f"{prefix}_skipped": len(skipped), f"{prefix}_skipped_files": skipped[:_MAX_LISTED]}


class _Encoder:
    """Uniform `encode_images(uint8)` / `encode_texts(list[str])` over students, teachers and ensembles."""

    def __init__(self, model: CLIPStudent | Teacher | TeacherEnsemble, kind: str, device: torch.device) -> None:
        self.model, self.kind, self.device = model.to(device).eval(), kind, device
        if kind == "student":
            self.image_size, self.interpolation = model.image_size, model.interpolation
        else:
            members = list(model.values()) if isinstance(model, TeacherEnsemble) else [model]
            self.image_size = max(m.image_size for m in members)
            self.interpolation = getattr(members[0].cfg, "interpolation", "bicubic")

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        images = images.to(self.device)
        if self.kind == "student":
            return self.model.encode_image(self.model.normalize(images), normalize=True).float()
        return _concat(self.model.encode_image(images))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        if self.kind == "student":
            return self.model.encode_text(self.model.tokenize(texts).to(self.device), normalize=True).float()
        return _concat(self.model.encode_texts(texts))


def _concat(out: Tensor | dict[str, Tensor]) -> Tensor:
    # An ensemble embeds as the concatenation of its normalised members, scaled to unit norm: its cosine is then
    # the mean of the members' cosines.
    if isinstance(out, dict):
        out = torch.cat([v.float() for v in out.values()], dim=-1) / math.sqrt(len(out))
    return F.normalize(out.float(), dim=-1)


def run_zeroshot(enc: _Encoder, ds: ImageFolderSet, templates: list[str], batch_size: int, workers: int = 0) -> dict:
    """Top-1 (and top-5 when there are > 5 classes) accuracy in percent, over the images that decode.

    Raises:
        UsageError: When no image of the set decodes.
    """
    classifier = zeroshot_classifier(enc.encode_texts, ds.classes, templates)
    correct1 = correct5 = total = 0
    skipped: list[str] = []
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_images):
        skipped += batch["skipped"]
        if not len(batch["label"]):
            continue
        logits = enc.encode_images(batch["image"]) @ classifier
        labels = batch["label"].to(logits.device)
        correct1 += int((logits.argmax(-1) == labels).sum())
        if logits.shape[1] > 5:
            correct5 += int((logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).sum())
        total += labels.numel()
    if total == 0:
        raise UsageError(f"zero-shot set: none of its {len(ds)} images could be decoded, e.g. {skipped[:1]}")
    out = {"zeroshot_top1": 100.0 * correct1 / total, "zeroshot_n": total, "zeroshot_classes": len(ds.classes)}
    if len(ds.classes) > 5:
        out["zeroshot_top5"] = 100.0 * correct5 / total
    out.update(_skip_report("zeroshot", skipped))
    return out


def run_retrieval(enc: _Encoder, ds: CaptionSet, batch_size: int, workers: int = 0) -> dict:
    """Recall@1/5/10 in both directions, in percent, over the images that decode.

    Raises:
        UsageError: When no image of the set decodes.
    """
    images, texts, owners, seen = [], [], [], 0
    skipped: list[str] = []
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_captions):
        skipped += batch["skipped"]
        if not batch["image"].shape[0]:
            continue
        images.append(enc.encode_images(batch["image"]))
        texts.append(enc.encode_texts(batch["captions"]))
        owners.append(batch["owner"] + seen)
        seen += batch["image"].shape[0]
    if not seen:
        raise UsageError(f"retrieval set: none of its {len(ds)} images could be decoded, e.g. {skipped[:1]}")
    out = retrieval_metrics(torch.cat(images), torch.cat(texts), torch.cat(owners))
    out.update({"retrieval_images": seen, "retrieval_captions": int(sum(t.shape[0] for t in texts))})
    out.update(_skip_report("retrieval", skipped))
    out["retrieval_split"] = ds.split
    return out


@renamed_kwargs({"data": "val"})  # `evaluate(data=EvalArgs(...))`, accepted for one release
def evaluate(
    student: str | None = None,
    teacher: str | None = None,
    val: EvalArgs = EvalArgs(),  # noqa: B008 - jsonargparse/litgpt dataclass-group default, never mutated
    out: Path | None = None,
    device: str = "auto",
    num_workers: int = 0,
) -> dict:
    """Zero-shot classification and image<->text retrieval of a student or a teacher.

    Args:
        student: A trained student (directory written by `distill train`, or a .ckpt), `local-dir:PATH`, or a
            registered student name (random weights: a chance-level baseline).
        teacher: A teacher name instead (`local-dir:PATH`, `hf:DIR`, a registered name, or a comma list).
        val: Evaluation sets (the `--val.*` group, as `distill train`'s validation sets); with none given, the
            embedded corpus's zero-shot and retrieval splits.
        out: Write the results JSON here (atomically).
        device: `auto`, `cpu` or `cuda`.
        num_workers: DataLoader workers for decoding.

    Returns:
        The metrics dict (also written to `out`).
    """
    if (student is None) == (teacher is None):
        raise UsageError("pass exactly one of --student or --teacher")
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if student is not None:
        path = Path(student.removeprefix("local-dir:")).expanduser()
        model = load_student(path) if path.exists() else create_student(student)
        enc, name = _Encoder(model, "student", dev), student
    else:
        enc, name = _Encoder(create_teacher(teacher), "teacher", dev), teacher
    zs, ret = val.zeroshot, val.retrieval
    if zs is None and ret is None:
        root = default_corpus()
        zs, ret = str(root / "zeroshot"), str(root / "val")
    results: dict[str, object] = {
        "model": name,
        "kind": "student" if student else "teacher",
        "image_size": enc.image_size,
        "device": str(dev),
    }
    if zs is not None:
        ds = ImageFolderSet(zs, enc.image_size, enc.interpolation, val.max_images)
        templates = list(val.templates or ds.templates or CLIP_TEMPLATES)
        results.update(run_zeroshot(enc, ds, templates, val.batch_size, num_workers))
        results["zeroshot_set"] = str(zs)
    if ret is not None:
        ds = CaptionSet(ret, enc.image_size, enc.interpolation, val.captions, val.split_file, val.max_images)
        results.update(run_retrieval(enc, ds, val.batch_size, num_workers))
        results["retrieval_set"] = str(ret)
    if out is not None:
        atomic_write_json(Path(out), results)
    return results


def format_results(res: dict) -> str:
    """A readable two-column table of an `evaluate` result."""
    rows = [("model", f"{res.get('model')} ({res.get('kind')}, {res.get('image_size')} px)")]
    if "zeroshot_top1" in res:
        top5 = f", top-5 {res['zeroshot_top5']:.2f} %" if "zeroshot_top5" in res else ""
        rows.append(
            (
                "zero-shot",
                f"top-1 {res['zeroshot_top1']:.2f} %{top5} "
                f"({res['zeroshot_n']} images, {res['zeroshot_classes']} classes)",
            )
        )
    if "i2t_R@1" in res:
        for d, label in (("i2t", "image->text"), ("t2i", "text->image")):
            rows.append((label, "  ".join(f"R@{k} {res[f'{d}_R@{k}']:.2f}" for k in (1, 5, 10))))
        split = res.get("retrieval_split", "all")
        rows.append(
            (
                "retrieval set",
                f"{res['retrieval_images']} images, {res['retrieval_captions']} captions (split: {split})",
            )
        )
    skipped = {k: res[f"{k}_skipped"] for k in ("zeroshot", "retrieval") if res.get(f"{k}_skipped")}
    if skipped:
        rows.append(("not decodable", ", ".join(f"{n} {k} image(s), left out" for k, n in skipped.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
