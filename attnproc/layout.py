"""TokenLayout: where the visual and text tokens sit in one attention call's sequence."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

TextPosition = Literal["none", "before", "after", "separate"]
TEXT_POSITIONS: tuple[str, ...] = get_args(TextPosition)
BranchName = Literal["cond", "uncond"]
BRANCH_NAMES: tuple[str, ...] = get_args(BranchName)


@dataclass(frozen=True)
class TokenLayout:
    """The layout of one attention call's query sequence, at that module's resolution.

    Visual tokens are in frame-major raster order ``(frame, row, column)``. ``text_position`` says where
    ``text_len`` text tokens sit: ``"before"``/``"after"`` the visual tokens in one joint sequence,
    ``"separate"`` for a cross-attention context, ``"none"`` for pure self-attention. ``branches`` names the
    equal chunks of the batch (``("uncond", "cond")`` for batched classifier-free guidance).
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: TextPosition = "none"
    text_valid: int | None = None
    branches: tuple[BranchName, ...] | None = None

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TokenLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"TokenLayout.text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
        if self.text_len < 0 or (self.text_position == "none" and self.text_len):
            raise ValueError(f"TokenLayout.text_len={self.text_len} does not fit text_position={self.text_position!r}")
        if self.branches is not None and not set(self.branches) <= set(BRANCH_NAMES):
            raise ValueError(f"TokenLayout.branches must name batch chunks from {BRANCH_NAMES}, got {self.branches!r}")
        if self.text_valid is not None and not 0 <= self.text_valid <= self.text_len:
            raise ValueError(f"TokenLayout.text_valid={self.text_valid} must be within [0, text_len={self.text_len}]")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def visual_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        """Length of the query sequence (visual plus joint text)."""
        joint = self.text_position in ("before", "after")
        return self.visual_len + (self.text_len if joint else 0)

    @property
    def visual_slice(self) -> slice:
        start = self.text_len if self.text_position == "before" else 0
        return slice(start, start + self.visual_len)

    @property
    def text_slice(self) -> slice:
        """The text tokens inside the joint sequence (an empty slice when text is separate or absent)."""
        if self.text_position == "before":
            return slice(0, self.text_len)
        if self.text_position == "after":
            return slice(self.visual_len, self.visual_len + self.text_len)
        return slice(0, 0)

    def with_(self, **changes) -> "TokenLayout":
        return replace(self, **changes)
