"""The label store's logit codecs: how many of each sample's K logits are kept, and in how many bits.

A store keeps, per sample, all K logits or the k largest with their class indices (top-k), each
value as fp16 (the paper's storage), an 8-bit code with a per-sample scale and offset, or fp8
(e4m3). ``LogitCodec`` is the one place that writes (``encode``) and reads (``decode``) them, for
relabel (one record at a time) and prune (many) alike; the store records the codec in its meta.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

QUANTS = ("fp16", "int8", "fp8")
# What a top-k store's other classes read back as (LPQLD's names): "mr" -inf, so softmax renormalizes
# the top k (lpld's top-k since its first release); "mrs" the sample's smallest logit; "ms" the logit
# that, at temperature 1, gives each of them an equal share of the probability the top k leave.
FILLS = ("mr", "mrs", "ms")
FP8_MAX = 448.0  # largest finite float8_e4m3fn; it has no infinity, so larger values must be clamped


def index_dtype(num_classes: int) -> np.dtype:
    """The narrowest integer type that holds a class index (uint8 up to 256 classes)."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.int16 if num_classes <= 2**15 else np.int32)


@dataclass(frozen=True)
class LogitCodec:
    """How a store keeps its logits: all K or the top k per sample, as fp16, int8 or fp8 values.

    - fp16: the teacher's logits rounded to fp16 (the paper's storage).
    - int8: 8-bit codes with a per-sample fp16 scale and offset (affine over the sample's kept
      values), 1 byte per value plus 4 per sample.
    - fp8: float8 e4m3 of the logits minus their sample maximum, 1 byte per value. Softmax does
      not change under a per-sample shift, and after it the top classes sit near 0, where e4m3 is
      finest; so the decoded logits equal the stored ones only up to that shift.
    Top-k stores the k largest values and their class indices; the other classes decode to the
    ``fill`` (LPQLD's decodings): MR, -inf, so softmax gives the top-k distribution renormalized
    (LPQLD's MR-k, lpld's top-k from the start); MRS, the sample's smallest logit (LPQLD's MRS-k);
    MS, the logit that gives each other class an equal share of the probability the top k leave at
    temperature 1 (LPQLD's MS-k as its online-teacher script defines it: top-k probabilities, the
    rest spread evenly). MRS and MS keep one fp16 fill value per sample, in the values' frame (fp8's
    shift included). Every codec decodes one record from one slice per array, and ``encode`` serves
    relabel (one record) and prune (many) alike.
    """

    topk: int = 0
    quant: str = "fp16"
    fill: str = "mr"

    @classmethod
    def of(cls, meta: dict) -> "LogitCodec":
        return cls(meta.get("topk", 0), meta.get("quant", "fp16"), meta.get("topk_fill", "mr"))

    @classmethod
    def parse(cls, name: str) -> "LogitCodec":
        """The inverse of ``name``: "fp8", "top2-fp8" or "top2mrs-fp16" (ValueError for anything else)."""
        top, _, quant = name.rpartition("-")
        match = re.fullmatch(r"top([1-9][0-9]*)(mrs|ms|mr)?", top)
        if quant not in QUANTS or (top and not match):
            raise ValueError(f"not a logit codec: {name!r}")
        return cls(int(match.group(1)), quant, match.group(2) or "mr") if top else cls(0, quant)

    def meta(self) -> dict:
        """The store meta fields naming this codec (no fill field for MR: older stores read the same)."""
        return {"topk": self.topk, "quant": self.quant, **({"topk_fill": self.fill} if self.fill != "mr" else {})}

    def check(self, num_classes: int) -> "LogitCodec":
        if self.quant not in QUANTS:
            raise UserError(f"logit quantization {self.quant!r}: choose one of {', '.join(QUANTS)}")
        if not 0 <= self.topk <= num_classes:
            raise UserError(f"--topk {self.topk}: must be between 0 (full logits) and the class count {num_classes}")
        if self.fill not in FILLS or (self.fill != "mr" and not self.topk):
            raise UserError(f"--topk-fill {self.fill!r}: one of {', '.join(FILLS)}, and only with --topk")
        return self

    @property
    def name(self) -> str:
        fill = "" if self.fill == "mr" else self.fill
        return f"top{self.topk}{fill}-{self.quant}" if self.topk else self.quant

    @property
    def array_names(self) -> tuple[str, ...]:
        return tuple(self.specs(0, 0, 0))

    def specs(self, rows: int, batch: int, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        width = self.topk or num_classes
        values = np.dtype(np.float16 if self.quant == "fp16" else np.uint8)
        specs = {"topk_values" if self.topk else "logits": ((rows, batch, width), values)}
        if self.topk:
            specs["topk_indices"] = ((rows, batch, self.topk), index_dtype(num_classes))
        if self.quant == "int8":
            specs["logit_scale"] = ((rows, batch), np.dtype(np.float16))
            specs["logit_offset"] = ((rows, batch), np.dtype(np.float16))
        if self.topk and self.fill != "mr":
            specs["logit_fill"] = ((rows, batch), np.dtype(np.float16))
        return specs

    def encode(self, logits) -> dict[str, np.ndarray]:
        """Arrays (as ``specs`` names them) holding logits [..., K] in this codec."""
        full = torch.as_tensor(np.asarray(logits)).float()
        z, arrays = full, {}
        if self.topk:
            top = full.topk(self.topk, dim=-1)
            z, arrays["topk_indices"] = top.values, top.indices.numpy()
            if self.fill != "mr":
                fill = self._fill(full, z)
                shift = z.amax(dim=-1) if self.quant == "fp8" else 0.0
                arrays["logit_fill"] = (fill - shift).to(torch.float16).numpy()
        name = "topk_values" if self.topk else "logits"
        if self.quant == "fp16":
            arrays[name] = z.to(torch.float16).numpy()
        elif self.quant == "fp8":
            shifted = (z - z.amax(dim=-1, keepdim=True)).clamp(min=-FP8_MAX)
            arrays[name] = shifted.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        else:
            low, high = z.amin(dim=-1), z.amax(dim=-1)
            offset = low.to(torch.float16)
            scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
            codes = ((z - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 255)
            arrays.update({name: codes.to(torch.uint8).numpy(), "logit_scale": scale.numpy(), "logit_offset": offset.numpy()})
        return arrays

    def _fill(self, full: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """The logit the other classes read back as: the sample's minimum (MRS), or log of an even share
        of the probability the top k leave, in logit units (MS: log(rest / (K - k)) + logsumexp)."""
        if self.fill == "mrs":
            return full.amin(dim=-1)
        others = full.shape[-1] - self.topk
        lse = torch.logsumexp(full.double(), dim=-1)
        rest = (1 - torch.exp(torch.logsumexp(top.double(), dim=-1) - lse)).clamp(min=0)
        return (torch.log(rest / max(others, 1)) + lse).float()

    def decode(self, arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
        """Dense fp16 logits [..., K] from this codec's arrays (the fill outside the top k)."""
        values = np.asarray(arrays["topk_values" if self.topk else "logits"])
        if self.quant == "fp8":
            values = torch.tensor(values).view(torch.float8_e4m3fn).to(torch.float16).numpy()  # a copy: memmaps are read-only
        elif self.quant == "int8":
            scale = np.asarray(arrays["logit_scale"], dtype=np.float32)[..., None]
            offset = np.asarray(arrays["logit_offset"], dtype=np.float32)[..., None]
            values = (values * scale + offset).astype(np.float16)
        if not self.topk:
            return values
        fill = np.asarray(arrays["logit_fill"], dtype=np.float16)[..., None] if self.fill != "mr" else -np.inf
        dense = np.broadcast_to(np.asarray(fill, dtype=np.float16), (*values.shape[:-1], num_classes)).copy()
        np.put_along_axis(dense, np.asarray(arrays["topk_indices"]).astype(np.int64), values, axis=-1)
        return dense


def add_codec_arguments(parser: argparse.ArgumentParser) -> None:
    """--topk and --quant, shared by the commands that write a store (relabel, prune)."""
    parser.add_argument("--topk", type=int, default=None,
                        help="keep only the k largest logits per sample (0 = all K; relabel's default 0, as the paper; "
                             "prune's default: the source's)")
    parser.add_argument("--quant", choices=QUANTS, default=None,
                        help="logit values as fp16 (relabel's default, the paper's), int8 (per-sample scale and offset) "
                             "or fp8 (e4m3); prune's default: the source's")
    parser.add_argument("--topk-fill", choices=FILLS, default=None,
                        help="what the other classes of a top-k store read back as (LPQLD's decodings): mr -inf "
                             "(default: the top k renormalized), mrs the sample's smallest logit, ms an even share of "
                             "the remaining probability; prune's default: the source's")


def codec_from_args(args: argparse.Namespace, base: LogitCodec = LogitCodec()) -> LogitCodec:
    """``base`` with the fields given on the command line replaced."""
    topk = base.topk if args.topk is None else args.topk
    fill = args.topk_fill or (base.fill if topk else "mr")
    return LogitCodec(topk, args.quant or base.quant, fill)
