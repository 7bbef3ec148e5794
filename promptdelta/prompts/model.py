"""PromptForClassification: backbone + template + verbalizer, for every backbone kind.

It talks to the backbone only through ``inputs_embeds``, ``attention_mask``/``token_type_ids`` and the
returned hidden states / logits, so soft templates and any delta work unchanged. Where the label word is
read depends on ``backbone.kind`` (the template writes the mask to match, see ``template.py``):

* ``mlm`` (BERT, RoBERTa): at the mask token, anywhere in the text.
* ``clm`` (GPT-2): the mask ends the template; the output at the last real token predicts the word.
* ``seq2seq`` (T5): the mask is the sentinel ``<extra_id_0>`` in the encoder; the decoder reads
  ``<pad> <extra_id_0>`` and its output at the sentinel predicts the word.

Label words of several tokens (clm, seq2seq) are scored by their full sequence log-likelihood
(Brown et al., 2020 score answer options the same way)::

    score(w) = sum_j log P(w_j | prompt, w_<j)            (length_normalize=True: divided by len(w))

then sent through the ManualVerbalizer's normalise -> calibrate -> aggregate steps. When every label word
is one token this equals the verbalizer's usual path, so that cheaper path is taken. On masked LMs the
verbalizer's ``multi_token_handler`` (first/mean/max) applies unchanged.

A classifier leaves the library as a folder (``save_pretrained`` / ``from_pretrained``, built in
``prompts/registry.py``) and answers new inputs through ``predict`` (``promptdelta/predict.py``: labels and
class probabilities, length-sorted batches, deltas merged for the call, the last layer pruned to the mask row
where the readout allows: ``pruned_positions``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from promptdelta.errors import DataError, TemplateError, VerbalizerError
from promptdelta.prompts.template import Template
from promptdelta.prompts.verbalizer import Verbalizer
from promptdelta.utils.pooling import grouped_mean

if TYPE_CHECKING:
    from promptdelta.predict import Predictions

logger = logging.getLogger(__name__)

SCORINGS = ("sequence", "verbalizer")
READOUTS = ("mask", "mean")


def check_template_kind(backbone: nn.Module, template: Template) -> str:
    """The backbone's kind; raise TemplateError when the template writes its mask for another kind."""
    kind = getattr(backbone, "kind", "mlm")
    t_kind = getattr(template, "kind", "mlm")
    if t_kind != kind:
        raise TemplateError(f"the template writes its mask for a {t_kind!r} backbone but this backbone "
                            f"({getattr(backbone, 'family', type(backbone).__name__)}) is {kind!r}; build the "
                            f"template with the backbone's own tokenizer, or pass kind={kind!r} to it")
    return kind


@functools.lru_cache(maxsize=None)
def _takes_keep_positions(backbone_type: type) -> bool:
    """Whether a backbone class's forward can prune its last layer (native BERT/RoBERTa: ``keep_positions``)."""
    try:
        return "keep_positions" in inspect.signature(backbone_type.forward).parameters
    except (TypeError, ValueError):
        return False


def batch_to(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a batch dict, moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class PromptForClassification(nn.Module):
    """Classify by filling the template's mask: label logits = verbalizer(backbone(template(x))[mask]).

    Args:
        backbone, template, verbalizer: the three parts (template.kind must equal backbone.kind).
        max_length: the token budget of a row (on clm it includes the label word's extra tokens).
        scoring: "sequence" scores multi-token label words by their full log-likelihood on clm/seq2seq
            backbones; "verbalizer" uses the verbalizer's own multi_token_handler on the first position.
        length_normalize: divide a word's summed log-likelihood by its number of tokens.
        readout: "mask" (default) gives the verbalizer the hidden state at the mask; "mean" gives it the
            mean of the last hidden states over the whole prompt-wrapped input (padding excluded), for
            sentence-embedding backbones trained with mean pooling (e.g. all-MiniLM-L6-v2) whose mask state
            carries little. Encoder-only or causal backbones with one mask; logits stay those at the mask.
    """

    def __init__(self, backbone: nn.Module, template: Template, verbalizer: Verbalizer,
                 max_length: int = 256, scoring: str = "sequence", length_normalize: bool = False,
                 readout: str = "mask") -> None:
        super().__init__()
        if scoring not in SCORINGS:
            raise VerbalizerError(f"scoring={scoring!r} is unknown; use one of {', '.join(SCORINGS)}")
        if readout not in READOUTS:
            raise VerbalizerError(f"readout={readout!r} is unknown; use one of {', '.join(READOUTS)}")
        self.kind = check_template_kind(backbone, template)
        self.backbone = backbone
        self.template = template
        self.verbalizer = verbalizer
        self.max_length = max_length
        self.scoring = scoring
        self.length_normalize = length_normalize
        self.readout = readout
        if readout == "mean" and self.kind == "seq2seq":
            raise VerbalizerError("readout='mean' needs an encoder-only or causal backbone; a T5 prompt is read "
                                  "in the decoder after the sentinel: use readout='mask'")
        self._logged_no_head = False
        self.prune_readout = True            # see pruned_positions(); False runs the full last layer (tests, timing)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def uses_sequence_scoring(self) -> bool:
        """True when label words of several tokens are scored by their full log-likelihood."""
        ids = getattr(self.verbalizer, "token_ids", None)            # (C, W, S) for a ManualVerbalizer
        multi = ids is not None and ids.shape[-1] > 1
        ok = multi and self.kind in ("clm", "seq2seq") and self.scoring == "sequence"
        if ok and not getattr(self.backbone, "has_lm_head", False):
            if not self._logged_no_head:
                logger.warning("the backbone has no LM head: multi-token label words fall back to the "
                               "verbalizer's first-position scoring")
                self._logged_no_head = True
            return False
        return ok

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Examples -> batch dict (on CPU); checks labels against the verbalizer's classes."""
        self.verbalizer.check_labels(examples)
        reserve = 0
        if self.kind == "clm" and self.uses_sequence_scoring:
            reserve = self.verbalizer.token_ids.shape[-1] - 1                 # label tokens fed after it
        return self.template.tokenize(list(examples), max_length=self.max_length - reserve)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Batch dict -> label logits (B, C)."""
        return self._label_logits(batch)[0]

    def _label_logits(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (label logits (B, C), hidden state at the label position (B, H) or None)."""
        batch = batch_to(batch, self.device)
        if self.uses_sequence_scoring:
            v = self.verbalizer
            return v.aggregate(v.calibrate(v.normalise(self.label_word_scores(batch)))), None   # (B, C)
        hidden, logits, _ = self._run(batch, keep_state=False)
        return self.verbalizer.process(hidden, logits, self.backbone), hidden                 # (B, C)

    def label_word_scores(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log P(word | prompt) of every label word (B, C, W): summed (or mean) token log-probs.

        Padded word slots hold 0; the verbalizer masks them. Needs a ManualVerbalizer and an LM head.
        """
        if getattr(self.verbalizer, "token_ids", None) is None or self.kind == "mlm":
            raise VerbalizerError("label_word_scores needs a ManualVerbalizer and a causal-LM or T5 "
                                  "backbone; on a masked LM use the verbalizer's multi_token_handler")
        if not getattr(self.backbone, "has_lm_head", False):
            raise VerbalizerError("label_word_scores needs the backbone's LM head; load a checkpoint that has "
                                  "one (tied embeddings or lm_head.weight)")
        batch = batch_to(batch, self.device)
        _, logits, state = self._run(batch, keep_state=True)
        cand = self.verbalizer.token_ids.reshape(-1, self.verbalizer.token_ids.shape[-1])   # (K, S)
        if self.kind == "clm":
            token_lp = self._clm_token_logprobs(batch, logits, state, cand)                 # (B*K, S)
        else:
            token_lp = self._seq2seq_token_logprobs(batch, state, cand)                      # (B*K, S)
        keep = self.verbalizer.token_mask.reshape(1, *cand.shape).expand(logits.shape[0], -1, -1)
        keep = keep.reshape(token_lp.shape).to(token_lp.dtype)                              # (B*K, S)
        scores = (token_lp * keep).sum(-1)
        if self.length_normalize:
            scores = scores / keep.sum(-1).clamp(min=1)
        return scores.reshape(logits.shape[0], *self.verbalizer.token_ids.shape[:2])       # (B, C, W)

    def _run(self, batch: Mapping[str, torch.Tensor], keep_state: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """-> (hidden (B, H), logits (B, V) | None at the label position, state for label scoring).

        A template with M > 1 masks (masked LM) gives hidden (B, M, H) and logits (B, M, V)."""
        embeds = self.backbone.input_embeddings()(batch["input_ids"])          # (B, T, H)
        embeds = self.template.process_embeds(embeds, batch)                   # (B, T', H)
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        mask_at = batch["mask_pos"][:, 0]                                       # (B,)
        if batch["mask_pos"].shape[1] > 1:                                      # several masks: (B, M) gathers
            if self.kind == "seq2seq":
                raise TemplateError("a T5 prompt reads the decoder after one sentinel; use a template with "
                                    "one {\"mask\"} on encoder-decoder backbones")
            rows, mask_at = rows[:, None], batch["mask_pos"]                    # hidden (B, M, H), logits (B, M, V)
        if self.kind == "seq2seq":
            sentinel = batch["input_ids"][rows, mask_at]                        # (B,)
            start = torch.full_like(sentinel, self.backbone.config.decoder_start_token_id)
            out = self.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                decoder_input_ids=torch.stack([start, sentinel], 1))   # decoder (B, 2)
            return out.last_hidden_state[:, 1], out.logits[:, 1], out.encoder_last_hidden_state
        extra = {"use_cache": True} if self.kind == "clm" and keep_state else {}
        keep = None if keep_state else self.pruned_positions(batch)            # (B, M) or None
        if keep is not None:                                                    # last layer only at the masks
            out = self.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                token_type_ids=batch.get("token_type_ids"), keep_positions=keep)
            one = keep.shape[1] == 1                                            # (B, 1, .) -> (B, .)
            hidden = out.last_hidden_state[:, 0] if one else out.last_hidden_state     # (B, H) | (B, M, H)
            logits = None if out.logits is None else (out.logits[:, 0] if one else out.logits)
            return hidden, logits, None
        out = self.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                            token_type_ids=batch.get("token_type_ids"), **extra)
        hidden = out.last_hidden_state[rows, mask_at]                          # (B, H)
        if self.readout == "mean":
            if hidden.dim() == 3:
                raise TemplateError("readout='mean' reads one vector per example; use a template with one "
                                    "{\"mask\"} or readout='mask'")
            # row_group: a template that reads one example as several rows (a long text in windows)
            hidden = grouped_mean(out.last_hidden_state, batch["attention_mask"], batch.get("row_group"))  # (B, H)
        logits = None if out.logits is None else out.logits[rows, mask_at]     # (B, V)
        return hidden, logits, getattr(out, "past_key_values", None)

    def pruned_positions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The positions (B, M) the readout reads, when the backbone can compute its last layer at those rows
        only (``keep_positions``: queries, attention output, MLP and norms at M rows, keys/values over all T;
        exact), else None. Only without autograd, with ``readout="mask"`` on a masked LM whose forward takes
        ``keep_positions``, ``prune_readout`` on, and no forward hook on the backbone or its last layer (a
        ladder delta reads every layer's full output). ``readout="mean"`` reads every position: nothing to
        prune. Saves ~(1 - 2/12)/L of an L-layer forward (~14% on MiniLM's 6 layers)."""
        if not self.prune_readout or self.readout != "mask" or self.kind != "mlm" or torch.is_grad_enabled():
            return None
        if not _takes_keep_positions(type(self.backbone)) or self.backbone._forward_hooks:
            return None
        layers = getattr(self.backbone, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers) or layers[-1]._forward_hooks:
            return None
        return batch["mask_pos"]

    def _clm_token_logprobs(self, batch: Mapping[str, torch.Tensor], first_logits: torch.Tensor,
                            past: Any, cand: torch.Tensor) -> torch.Tensor:
        """Causal LM: token log-probs (B*K, S) of K candidates after each prompt, through the KV cache.

        The prompt is run once; the cache (right padding included, masked out) is repeated per candidate
        and the candidates' first S-1 tokens are fed after it. Positions follow the attention mask.
        """
        B, (K, S) = first_logits.shape[0], cand.shape
        first = first_logits.float().log_softmax(-1)[:, cand[:, 0]].reshape(B * K, 1)   # (B*K, 1)
        if S == 1:
            return first
        past = tuple((k.repeat_interleave(K, 0), v.repeat_interleave(K, 0)) for k, v in past)
        mask = batch["attention_mask"].repeat_interleave(K, 0)                              # (B*K, T)
        mask = torch.cat([mask, mask.new_ones(B * K, S - 1)], 1)                            # (B*K, T+S-1)
        out = self.backbone(input_ids=cand[:, :-1].repeat(B, 1), attention_mask=mask, past_key_values=past)
        rest = out.logits.float().log_softmax(-1)                                           # (B*K, S-1, V)
        rest = rest.gather(-1, cand[:, 1:].repeat(B, 1)[..., None]).squeeze(-1)             # (B*K, S-1)
        return torch.cat([first, rest], 1)                                                  # (B*K, S)

    def _seq2seq_token_logprobs(self, batch: Mapping[str, torch.Tensor], enc: torch.Tensor,
                                cand: torch.Tensor) -> torch.Tensor:
        """T5: token log-probs (B*K, S) of K candidates, decoder input <start> <sentinel> w_1 .. w_{S-1}."""
        B, K = enc.shape[0], cand.shape[0]
        rows = torch.arange(B, device=enc.device)
        sentinel = batch["input_ids"][rows, batch["mask_pos"][:, 0]].repeat_interleave(K)  # (B*K,)
        start = torch.full_like(sentinel, self.backbone.config.decoder_start_token_id)
        words = cand.repeat(B, 1)                                                           # (B*K, S)
        dec = torch.cat([start[:, None], sentinel[:, None], words[:, :-1]], 1)              # (B*K, S+1)
        out = self.backbone(encoder_outputs=enc.repeat_interleave(K, 0), decoder_input_ids=dec,
                            attention_mask=batch["attention_mask"].repeat_interleave(K, 0))
        lp = out.logits[:, 1:].float().log_softmax(-1)                                      # (B*K, S, V)
        return lp.gather(-1, words[..., None]).squeeze(-1)                                  # (B*K, S)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean cross-entropy [+ verbalizer.extra_loss(hidden, labels)], label logits (B, C)).

        The batch must carry labels."""
        if "labels" not in batch:
            raise DataError("the batch has no labels, so no loss can be computed; give every example a "
                            "label (or use predict() for unlabelled data)")
        logits, hidden = self._label_logits(batch)
        labels = batch["labels"].to(logits.device)
        loss = F.cross_entropy(logits, labels)
        extra = getattr(self.verbalizer, "extra_loss", None)                   # e.g. ProtoVerb's L_ins
        if extra is not None and hidden is not None:
            loss = loss + extra(hidden, labels)
        return loss, logits

    def predict(self, inputs: Any, batch_size: int = 32, top_k: int | None = None,
                delta: Sequence[str | None] | None = None, progress: bool = False,
                columns: Mapping[str, str] | None = None) -> Predictions:
        """Labels and class probabilities of ``inputs`` (strings, dicts, InputExamples, a datasets.Dataset or a
        pandas DataFrame), in input order: sorted by length into batches, eval mode and inference mode,
        mergeable deltas merged for the call (mode and merge state restored). ``delta``: one attached delta
        name per row (None: base only), served in mixed batches by ``promptdelta.deltas.mixed.route_rows``.
        ``columns``: {"text": "review", "text_b": ...} for dict rows. See ``promptdelta.predict``."""
        from promptdelta.predict import predict

        return predict(self, inputs, batch_size=batch_size, top_k=top_k, delta=delta, progress=progress,
                       columns=columns)

    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write this classifier as a folder: template, verbalizer (words, weights, calibration), readout,
        max length, every attached delta, the tokenizer, the backbone's identity and fingerprint (safetensors +
        JSON, atomically). An existing classifier is replaced only with ``overwrite=True``."""
        from promptdelta.prompts.registry import save_classifier

        return save_classifier(self, path, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path: str | Path, backbone: nn.Module | None = None, tokenizer: Any = None,
                        delta_names: Mapping[str, str] | None = None) -> PromptForClassification:
        """Load a folder written by ``save_pretrained`` (or a ``promptdelta run`` seed folder).

        ``backbone=None`` loads the recorded backbone (preset, folder or hub id) with ``pd.load_backbone``; a
        given backbone must have the recorded fingerprint, and the folder's deltas are attached to it (renamed
        by ``delta_names`` {saved: new}). ``tokenizer=None`` uses the folder's own."""
        from promptdelta.prompts.registry import load_classifier

        return load_classifier(path, backbone=backbone, tokenizer=tokenizer, delta_names=delta_names)
