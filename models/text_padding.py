"""How far a training batch's captions are padded (``model.text_padding``), shared by every model family.

* ``longest``: to the batch's longest caption (least work; every new length is a new shape);
* ``bucket``: to the next multiple of ``BUCKET_MULTIPLE`` tokens, capped at ``max_text_length``: at most
  ``max_text_length / 8`` shapes (5 for BLIP's 40), so ``torch.compile`` and CUDA graphs compile a few variants
  instead of one per length, while padding costs at most 7 positions per row;
* ``max_length``: to ``max_text_length`` (one shape; the most padding).

Padded positions carry attention mask 0 and target IGNORE_INDEX, so the loss is the same for all three.
``after_first_end`` finds the padding after a generated caption's end token, for every family.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TEXT_PADDINGS = ("longest", "bucket", "max_length")
BUCKET_MULTIPLE = 8


def check_text_padding(padding: str) -> str:
    if padding not in TEXT_PADDINGS:
        raise ValueError(f"text_padding must be one of {list(TEXT_PADDINGS)}, got {padding!r}")
    return padding


def padded_length(longest: int, max_text_length: int, padding: str) -> int:
    """The padded length T of a batch whose longest (already truncated) caption has ``longest`` tokens."""
    check_text_padding(padding)
    if padding == "max_length":
        return max_text_length
    if padding == "bucket":
        return min(max_text_length, -(-longest // BUCKET_MULTIPLE) * BUCKET_MULTIPLE)
    return longest


def pad_rows(rows: list[list[int]], length: int, pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists (already truncated, none longer than ``length``) -> (B, ``length``) ids right-padded with
    ``pad_id`` and their attention mask (1 on the tokens), on ``device``; the families' ``tokenize`` ends here."""
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, ids in enumerate(rows):  # one row at a time: a list per caption, never per token
        input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[index, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def pad_to(input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
           pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask right-padded to (B, ``length``) with ``pad_id`` and mask 0 (``length`` >= L)."""
    extra = length - input_ids.shape[1]
    return F.pad(input_ids, (0, extra), value=pad_id), F.pad(attention_mask, (0, extra), value=0)


def after_first_end(ids: torch.Tensor, end_ids: list[int], start: int = 0) -> torch.Tensor:
    """(B, L) bool, True after each row's first end token: the padding a generated caption carries once it ended.

    ``end_ids``: the ids that end a caption (BLIP's [SEP]; the prefix LM's EOS and stop token); ``start``: columns
    before it never end a caption (BLIP's bos + prompt). The end token itself stays False, as it belongs to the
    caption (attended, and scored as its last target).
    """
    ended = torch.isin(ids, torch.tensor(end_ids, dtype=ids.dtype, device=ids.device))
    ended[:, :start] = False
    ended = ended.long()
    return (ended.cumsum(dim=1) - ended) > 0
