"""``BlockSize``: the structures one decoder block keeps."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BlockSize"]


@dataclass(frozen=True)
class BlockSize:
    """Structures one decoder block keeps: attention structures (KV groups, or heads) and FFN neurons."""

    attention: int
    mlp: int

    def to_dict(self) -> dict[str, int]:
        return {"attention": self.attention, "mlp": self.mlp}
