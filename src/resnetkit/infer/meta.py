"""What a model knows about itself, whatever file it came from: its class names, its
preprocessing and where it came from. Metadata read from a file is untrusted input: it is
validated here once, the same way for a checkpoint, an ONNX file and an OpenVINO IR."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..untrusted import parse_json, shown
from ..data.preprocess import complete
from ..weights.checkpoint import check_preprocess

KEYS = ("classes", "preprocess")  # what an exported file carries (see infer.export)
EXPORTED = {".onnx": "onnx", ".xml": "openvino"}  # file suffix -> source kind


@dataclass(frozen=True)
class Meta:
    """classes: the class names in output order (None: unnamed); preprocess: the complete
    "preprocess" entry (mean, std, image_size, resize, interpolation, in_chans), or None
    where the source has none; source: the source as given, for messages; kind: "checkpoint",
    "tag", "foreign", "preset", "model", "onnx" or "openvino"."""

    classes: list[str] | None
    preprocess: dict[str, Any] | None
    source: str
    kind: str

    def __post_init__(self) -> None:
        if self.preprocess is not None:  # every key present, whatever the source gave
            object.__setattr__(self, "preprocess", complete(self.preprocess))

    @classmethod
    def from_strings(cls, entries: dict[str, str], outputs: int | None, in_chans: int,
                     source: Any, kind: str) -> "Meta":
        """Meta from an exported file's text entries (ONNX metadata_props, an IR's rt_info):
        each bounded JSON (untrusted.parse_json), the classes a list of names, one per
        output where the outputs are fixed, the preprocessing checked like a checkpoint's
        (weights.checkpoint.check_preprocess). Raises UserError naming the file."""
        info = {k: parse_json(v, str(source), f"{k} metadata") for k, v in entries.items()
                if k in KEYS}
        classes = info.get("classes")
        if classes is not None and (not isinstance(classes, list) or not all(
                isinstance(c, str) for c in classes) or (outputs is not None
                                                         and len(classes) != outputs)):
            n = f"{outputs} " if outputs is not None else ""
            raise UserError(f"{shown(source)}: its class list does not match its {n}outputs")
        pre = info.get("preprocess")
        if pre is not None:
            pre = check_preprocess(pre, in_chans, str(source))
        return cls(classes, pre, str(source), kind)

    def class_names(self, outputs: int) -> list[str]:
        """The class names, or the output numbers where the source names none."""
        return self.classes or [str(i) for i in range(outputs)]

    def need_preprocess(self) -> dict[str, Any]:
        """The preprocessing; a UserError saying what to use instead where there is none."""
        if self.preprocess is not None:
            return self.preprocess
        hint = ("export it from a trained checkpoint with `resnetkit export RUN_DIR`"
                if self.kind in EXPORTED.values() else
                "use a checkpoint that resnetkit trained, or convert it with `resnetkit "
                "weights convert`")
        raise UserError(f"{shown(self.source)} has no preprocessing metadata (mean, std, input "
                        f"size); {hint}")

    def entries(self) -> dict[str, Any]:
        """{"classes", "preprocess"}, those present: what an exported file is given."""
        return {k: v for k, v in (("classes", self.classes), ("preprocess", self.preprocess))
                if v is not None}
