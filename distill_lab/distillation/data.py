"""Training data for distillation: next-token labels, and teacher-generated sequences.

Sequence-level KD trains a student on the teacher's own generations (Kim & Rush, 2016,
arXiv:1606.07947): ``generate_distillation_data`` returns a ``SequenceData`` whose labels cover
only the teacher's continuations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime import device_of
from .losses import IGNORE_INDEX

__all__ = ["SequenceData", "generate_distillation_data", "shift_labels"]


@dataclass
class SequenceData:
    """Teacher-generated sequences for sequence-level KD: ids, labels (prompt and padding -100), texts."""

    input_ids: torch.Tensor  # (N, L) prompt + continuation, right-padded
    labels: torch.Tensor  # (N, L) aligned next-token labels; -100 on prompt and padding
    texts: list[str]  # the generated continuations, decoded

    def __len__(self) -> int:
        return len(self.input_ids)


@torch.no_grad()
def generate_distillation_data(teacher: nn.Module, tokenizer, prompts: list[str],
                               max_new_tokens: int = 64, sampling_temperature: float = 0.0, seed: int = 0,
                               chat: bool = False, progress: bool = True) -> SequenceData:
    """Let the teacher answer each prompt and return the token sequences for a student to learn from.

    Labels cover only the teacher's continuation (the prompt and padding are -100), so a student
    trained with ``DistillationLoss(alpha=0)`` imitates the teacher's outputs (Kim & Rush, 2016).
    """
    if not prompts:
        raise ValueError("prompts=[]; allowed: a non-empty list of strings")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; allowed: an int >= 1")
    if not sampling_temperature >= 0:
        raise ValueError(f"sampling_temperature={sampling_temperature}; allowed: >= 0 (0 means greedy)")
    device = device_of(teacher)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs, prompt_lens, texts = [], [], []
    for j, prompt in enumerate(tqdm(prompts, desc="teacher generations", leave=False,
                                    disable=not progress)):
        text = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                              add_generation_prompt=True) if chat else prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        torch.manual_seed(seed + j)
        kwargs = (dict(do_sample=True, temperature=sampling_temperature, top_k=0, top_p=1.0)
                  if sampling_temperature > 0
                  else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
        out = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               pad_token_id=pad, **kwargs)[0].cpu()
        seqs.append(out)
        prompt_lens.append(ids.shape[1])
        texts.append(tokenizer.decode(out[ids.shape[1]:], skip_special_tokens=True))
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for r, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[r, :len(s)] = s
        labels[r, p - 1:len(s) - 1] = s[p:]  # logits at t predict token t + 1
    return SequenceData(input_ids, labels, texts)



def shift_labels(input_ids: torch.Tensor, pad_token_id: int | None = None) -> torch.Tensor:
    """Next-token labels aligned with the logits: ``labels[:, t] = ids[:, t + 1]``, the last (and pads) -100."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if pad_token_id is not None:
        labels[:, :-1][input_ids[:, 1:] == pad_token_id] = IGNORE_INDEX
    return labels


