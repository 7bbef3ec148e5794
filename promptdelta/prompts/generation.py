"""PromptForGeneration: text-to-text through a template (OpenPrompt's PromptForGeneration, on our backbones).

The template's mask marks where the output goes; the target text comes from ``example.meta["target"]``
(or an attribute ``tgt_text``).

* Causal LM (GPT-2): the row is ``prompt  target  <eos>``; the loss is the next-token cross-entropy on the
  target and EOS only (prompt and padding labelled -100, labels shifted inside, as transformers does).
* Encoder-decoder (T5): the encoder reads the prompt with ``<extra_id_0>`` at the mask; the labels are
  ``<extra_id_0> target </s>`` (T5's span-corruption format) and the loss is the backbone's own
  teacher-forced loss with those labels.

``generate()`` runs the prompt through the template (soft tokens included, via ``inputs_embeds``) and
decodes with the backbone's KV cache and the shared ``decode_loop`` (greedy, or sampling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from promptdelta.backbones.generation import GenerationConfig, decode_loop
from promptdelta.errors import DataError, TemplateError
from promptdelta.prompts.model import batch_to, check_template_kind
from promptdelta.prompts.template import Template

IGNORE = -100


class PromptForGeneration(nn.Module):
    """Backbone + template for text generation with a teacher-forced loss.

    Args:
        backbone: a causal-LM ("clm") or encoder-decoder ("seq2seq") native backbone with an LM head.
        template: its mask ends the prompt (clm) or becomes the sentinel (seq2seq).
        max_length: token budget of the prompt; max_target_length: of the target (EOS included).
        target_key: the ``example.meta`` key that holds the target text.
        target_prefix: put before the target when tokenising (BPE tokenizers mark a word start by a space).
    """

    def __init__(self, backbone: nn.Module, template: Template, max_length: int = 256,
                 max_target_length: int = 64, target_key: str = "target", target_prefix: str = " ") -> None:
        super().__init__()
        self.kind = check_template_kind(backbone, template)
        if self.kind not in ("clm", "seq2seq"):
            raise TemplateError(f"PromptForGeneration needs a causal-LM or encoder-decoder backbone, got "
                                f"{self.kind!r}; use GPT-2 or T5 (for a masked LM use PromptForClassification)")
        if not getattr(backbone, "has_lm_head", False):
            raise TemplateError("the backbone has no LM head, so it cannot generate; load a checkpoint with an "
                                "LM head (tied embeddings or lm_head.weight)")
        self.backbone, self.template = backbone, template
        self.tokenizer = template.tokenizer
        self.max_length, self.max_target_length = max_length, max_target_length
        self.target_key, self.target_prefix = target_key, target_prefix

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def eos_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return self.backbone.config.eos_token_id if eos is None else eos

    def target_text(self, example: Any) -> str:
        """The target of one example: ``example.tgt_text`` or ``example.meta[target_key]``."""
        text = getattr(example, "tgt_text", None)
        meta = getattr(example, "meta", None) or {}
        text = meta.get(self.target_key) if text is None else text
        if text is None:
            raise DataError(f"example {getattr(example, 'guid', '')!r} has no target text; put it in "
                            f"meta={{{self.target_key!r}: '...'}} (or set target_key= to the key you use)")
        return str(text).strip()

    def _target_ids(self, examples: Sequence[Any]) -> list[list[int]]:
        """Target token ids (+ EOS) per example, cut to max_target_length."""
        texts = [self.target_prefix + self.target_text(e) for e in examples]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(row)[:self.max_target_length - 1] + [self.eos_token_id] for row in ids]

    def prompt_batch(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The template's batch for the prompts alone (no labels)."""
        batch = self.template.tokenize(list(examples), max_length=self.max_length)
        batch.pop("labels", None)
        return batch

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Examples with targets -> batch dict with ``labels`` (on CPU)."""
        batch, targets = self.prompt_batch(examples), self._target_ids(examples)
        if self.kind == "seq2seq":
            rows = torch.arange(len(targets))
            sentinel = batch["input_ids"][rows, batch["mask_pos"][:, 0]].tolist()
            batch["labels"] = _pad([[s] + t for s, t in zip(sentinel, targets)], IGNORE)   # (B, L)
            return batch
        lengths = batch["attention_mask"].sum(1).tolist()
        prompts = [row[:n].tolist() for row, n in zip(batch["input_ids"], lengths)]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch["input_ids"] = _pad([p + t for p, t in zip(prompts, targets)], pad_id)      # (B, T)
        batch["attention_mask"] = _pad([[1] * (len(p) + len(t)) for p, t in zip(prompts, targets)], 0)
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        batch["labels"] = _pad([[IGNORE] * len(p) + t for p, t in zip(prompts, targets)], IGNORE)
        return batch

    def _embeds(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        embeds = self.backbone.input_embeddings()(batch["input_ids"])          # (B, T, H)
        return self.template.process_embeds(embeds, batch)                     # (B, T', H)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits: (B, T, V) over the row (clm) or the labels (seq2seq)."""
        batch = batch_to(batch, self.device)
        if self.kind == "seq2seq":
            return self.backbone(inputs_embeds=self._embeds(batch), attention_mask=batch["attention_mask"],
                                 labels=batch["labels"]).logits
        return self.backbone(inputs_embeds=self._embeds(batch), attention_mask=batch["attention_mask"]).logits

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean token cross-entropy over the target tokens, logits)."""
        if "labels" not in batch:
            raise DataError("the batch has no labels; build it with collate() from examples that carry a "
                            f"target (meta[{self.target_key!r}])")
        logits = self(batch)
        labels = batch["labels"].to(logits.device)
        if self.kind == "clm":                                                  # position t predicts t+1
            logits_, labels = logits[:, :-1], labels[:, 1:]
        else:
            logits_ = logits
        loss = F.cross_entropy(logits_.reshape(-1, logits_.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE)
        return loss, logits

    @torch.no_grad()
    def generate(self, examples: Sequence[Any], max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[str]:
        """Generated text for every example (special tokens removed); eval mode, then the mode restored."""
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=self.eos_token_id,
                               pad_token_id=self.tokenizer.pad_token_id)
        was_training = self.training
        self.eval()
        try:
            tokens = self.generate_ids(self.prompt_batch(examples), cfg, generator)       # (B, N)
        finally:
            self.train(was_training)
        return [self.tokenizer.decode(_until_eos(row, cfg.eos_ids), skip_special_tokens=True).strip()
                for row in tokens.tolist()]

    def generate_ids(self, batch: Mapping[str, torch.Tensor], config: GenerationConfig,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """New token ids (B, N) after each prompt of a template batch."""
        batch = batch_to(batch, self.device)
        step = self._clm_step(batch) if self.kind == "clm" else self._seq2seq_step(batch)
        return decode_loop(step, batch["input_ids"].shape[0], config, generator=generator, device=self.device)

    def _clm_step(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Decoding step for a causal LM; the right-padded prompt stays in the cache, masked out."""
        state: dict[str, Any] = {"mask": batch["attention_mask"], "past": None}
        rows = torch.arange(batch["input_ids"].shape[0], device=self.device)

        def step(new: torch.Tensor | None) -> torch.Tensor:
            if new is None:
                out = self.backbone(inputs_embeds=self._embeds(batch), attention_mask=state["mask"],
                                    use_cache=True)
                state["past"] = out.past_key_values
                return out.logits[rows, batch["mask_pos"][:, 0]]               # (B, V) at the last real token
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(rows), 1)], 1)  # (B, S+1)
            out = self.backbone(input_ids=new, attention_mask=state["mask"], past_key_values=state["past"],
                                use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[:, -1]                                           # (B, V)
        return step

    def _seq2seq_step(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Decoding step for T5: the decoder starts from ``<start> <sentinel>``."""
        mask = batch["attention_mask"]
        enc = self.backbone.encode(inputs_embeds=self._embeds(batch), attention_mask=mask).last_hidden_state
        rows = torch.arange(enc.shape[0], device=enc.device)
        sentinel = batch["input_ids"][rows, batch["mask_pos"][:, 0]]            # (B,)
        start = torch.stack([torch.full_like(sentinel, self.backbone.config.decoder_start_token_id), sentinel], 1)
        cache: list[Any] = [None]

        def step(new: torch.Tensor | None) -> torch.Tensor:
            out = self.backbone(decoder_input_ids=start if new is None else new, attention_mask=mask,
                                encoder_outputs=enc, past_key_values=cache[0], use_cache=True)
            cache[0] = out.past_key_values
            return out.logits[:, -1]                                           # (B, V)
        return step


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad int rows to the longest: (B, L) LongTensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _until_eos(row: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """The tokens of a row before its first EOS."""
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return row[:i]
    return row
