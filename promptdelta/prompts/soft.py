"""Soft templates: learned prompt vectors written into the input embeddings.

    MixedTemplate    manual text + soft pieces in the template DSL (OpenPrompt's MixedTemplate):
                     '{"placeholder":"text_a"} {"soft": "It was"} {"mask"}.'
    SoftTemplate     prompt tuning (Lester et al. 2021): n learned vectors P (n, H) before the template,
                     [CLS] p_1 .. p_n x It was [MASK] . [SEP]
    PtuningTemplate  P-tuning v1 (Liu et al. 2021, "GPT Understands, Too"): the soft vectors are made by a
                     prompt encoder, h = MLP(BiLSTM(e_1 .. e_n)) or h_i = MLP(e_i)

How soft slots travel: ``tokenize`` reserves one position per soft token (``soft_markers``), and the batch
carries ``soft_pos`` (B, S), the positions in each row, and ``soft_ids`` (B, S), the row of the template's
soft table for each. ``process_embeds(inputs_embeds, batch)`` writes ``soft_vectors()[soft_ids]`` into those
positions, so every backbone family works through ``inputs_embeds``. The template's parameters (the soft
table ``soft_embeds`` (N, H), plus the encoder for P-tuning) are its whole ``state_dict``; ``save``/``load``
write and read them as safetensors, atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from promptdelta.errors import CheckpointError, MissingFileError, TemplateError
from promptdelta.prompts.dsl import Piece, parse_template, read_template_line
from promptdelta.prompts.registry import register_template, template_text
from promptdelta.prompts.template import ManualTemplate
from promptdelta.utils.io import atomic_save_safetensors

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "prompt.safetensors"
SOFT_INITS = ("vocab", "random")
PROMPT_ENCODERS = ("lstm", "mlp")
DEFAULT_SOFT_TEXT = '{"placeholder":"text_a"} {"mask"}'


class MixedTemplate(ManualTemplate):
    """A template text with soft pieces (learned vectors) among the words.

    ``{"soft"}`` is one vector drawn from N(0, std(E)^2) (E: the word embeddings, so it has their scale);
    ``{"soft": "It was"}`` is one vector per token of the text, initialised from those tokens' embeddings;
    ``"duplicate": n`` makes n random vectors (``"same": true``: one vector used n times); pieces with the
    same ``soft_id`` share the vectors of the first such piece.

    Args:
        text: the template, e.g. ``'{"placeholder":"text_a"} {"soft":"It was"} {"mask"}.'``.
        tokenizer: the backbone's HF tokenizer.
        backbone: the model (or its input ``nn.Embedding``): sizes and initialises the soft vectors. It is
            not kept, so the template's state_dict holds only its own parameters.
        post_processing, kind: as for ManualTemplate.
        prefix_init: (n, H) initial vectors of n soft tokens put before the text (SoftTemplate sets it).
    """

    def __init__(self, text: str, tokenizer: Any, backbone: Any,
                 post_processing: Mapping[str, Callable[[str], str]] | None = None,
                 kind: str | None = None, prefix_init: torch.Tensor | None = None) -> None:
        weight = _embedding_weight(backbone)                                     # (V, H)
        if prefix_init is not None:
            text = f'{{"soft": null, "duplicate": {len(prefix_init)}}} {text}'
        super().__init__(text, tokenizer, post_processing=post_processing, kind=kind)
        self._slots: dict[int, list[int]] = {}                                   # piece column -> slots
        self.soft_embeds = nn.Parameter(self._build_soft(weight, prefix_init))  # (N, H)

    @classmethod
    def from_file(cls, path: str | Path, choice: int = 0, tokenizer: Any = None, backbone: Any = None,
                  **kwargs: Any) -> MixedTemplate:
        """Load template number ``choice`` of a template file (one per line, OpenPrompt format)."""
        return cls(read_template_line(path, choice), tokenizer=tokenizer, backbone=backbone, **kwargs)

    @property
    def num_soft_tokens(self) -> int:
        """Number of distinct soft vectors (shared and ``same`` tokens count once)."""
        return int(self.soft_embeds.shape[0])

    def soft_vectors(self) -> torch.Tensor:
        """The vectors written at the soft slots: (N, H)."""
        return self.soft_embeds

    def soft_markers(self, piece: Piece) -> list[int]:
        return [-1 - slot for slot in self._slots[piece.column]]

    def process_embeds(self, inputs_embeds: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Write the soft vectors at ``soft_pos``: (B, T, H) -> (B, T, H) (a new tensor)."""
        if "soft_pos" not in batch:
            if self.num_soft_tokens == 0:
                return inputs_embeds
            raise TemplateError(f"the batch has no soft_pos, so {type(self).__name__} cannot place its soft "
                                f"vectors; build the batch with this template (template.tokenize or "
                                f"PromptForClassification.collate)")
        pos, ids = batch["soft_pos"], batch["soft_ids"]                         # (B, S)
        if ids.numel() and int(ids.max()) >= self.num_soft_tokens:
            raise TemplateError(f"the batch asks for soft vector {int(ids.max())} but this template has "
                                f"{self.num_soft_tokens}; tokenize the batch with this template")
        vectors = self.soft_vectors()[ids.to(self.soft_embeds.device)]         # (B, S, H)
        rows = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)   # (B, S)
        return inputs_embeds.index_put((rows, pos), vectors.to(inputs_embeds))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the template's parameters to ``path`` (a file, or a folder -> prompt.safetensors)."""
        path = _checkpoint_path(path)
        if path.exists() and not overwrite:
            raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it, or choose "
                                  f"another path")
        meta = {"format": "promptdelta.template", "class": type(self).__name__, "text": self.text}
        return atomic_save_safetensors(path, self.state_dict(), metadata=meta)

    def load(self, path: str | Path) -> MixedTemplate:
        """Load parameters written by ``save`` (or a run's prompt.safetensors, keys ``template.*``)."""
        tensors, meta = _read_checkpoint(_checkpoint_path(path))
        if any(k.startswith("template.") for k in tensors):
            tensors = {k[len("template."):]: v for k, v in tensors.items() if k.startswith("template.")}
        own = self.state_dict()
        saved_by = f"{meta.get('class', 'an unknown template')} with text {meta.get('text', '?')!r}"
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit this {type(self).__name__}: missing "
                                  f"{missing or 'none'}, unexpected {unexpected or 'none'} (it was saved by "
                                  f"{saved_by}); load it into a template of the same class and options")
        for key, value in tensors.items():
            if value.shape != own[key].shape:
                raise CheckpointError(f"{key} in {path} has shape {tuple(value.shape)} but this template's "
                                      f"is {tuple(own[key].shape)} (saved by {saved_by}); use the same "
                                      f"template text and backbone as when it was saved")
        self.load_state_dict(tensors)
        return self

    def _piece_text(self, piece: Piece, example: Any) -> str:
        return "" if piece.kind == "soft" else super()._piece_text(piece, example)

    def _check_piece(self, piece: Piece) -> None:
        if piece.kind != "soft":
            super()._check_piece(piece)

    def _build_soft(self, weight: torch.Tensor, prefix_init: torch.Tensor | None) -> torch.Tensor:
        """Give every soft piece its slots (rows of the soft table) and return the initial table (N, H)."""
        shared: dict[int, tuple[list[int], int]] = {}                           # soft_id -> (slots, column)
        rows: list[torch.Tensor] = []
        n_rows = 0
        for i, piece in enumerate(p for p in self.pieces if p.kind == "soft"):
            if piece.soft_id in shared:
                _check_reuse(piece, shared[piece.soft_id][1], self.text)
                self._slots[piece.column] = shared[piece.soft_id][0]
                continue
            init = prefix_init if (i == 0 and prefix_init is not None) else self._init_rows(piece, weight)
            slots = list(range(n_rows, n_rows + len(init)))
            n_rows += len(init)
            rows.append(init.to(weight))
            self._slots[piece.column] = slots * piece.duplicate if piece.same else slots
            if piece.soft_id is not None:
                shared[piece.soft_id] = (self._slots[piece.column], piece.column)
        return torch.cat(rows).detach().clone() if rows else weight.new_zeros(0, weight.shape[1])

    def _init_rows(self, piece: Piece, weight: torch.Tensor) -> torch.Tensor:
        """Initial vectors of one soft piece: its text's token embeddings, or N(0, std(E)^2) rows."""
        if piece.value is not None:
            ids = self.tokenizer((" " if piece.space_before else "") + piece.value,
                                 add_special_tokens=False)["input_ids"]
            if not ids:
                raise TemplateError(f"soft init text {piece.value!r} (column {piece.column} of {self.text!r}) "
                                    f"tokenises to nothing; write other words or use {{\"soft\"}}")
            return weight[list(ids)]                                             # (n, H)
        n = 1 if piece.same else (piece.duplicate or 1)
        return _random_rows(n, weight)


class SoftTemplate(MixedTemplate):
    """Prompt tuning (Lester et al. 2021): ``num_tokens`` learned vectors before the template text.

    The input becomes [CLS] p_1 .. p_n <template> [SEP]; only P (n, H) is trained. Initialisation:
    ``init_text`` (its token embeddings, repeated to n tokens: the paper's class-label / text init), else
    ``init="vocab"`` (embeddings of n tokens drawn from the vocabulary, special and [unused]-style tokens
    excluded; the paper draws from the 5,000 most frequent, which a tokenizer does not record) or
    ``init="random"`` (N(0, std(E)^2)).
    """

    def __init__(self, text: str = DEFAULT_SOFT_TEXT, tokenizer: Any = None, backbone: Any = None,
                 num_tokens: int = 20, init: str = "vocab", init_text: str | None = None,
                 post_processing: Mapping[str, Callable[[str], str]] | None = None,
                 kind: str | None = None) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise TemplateError(f"num_tokens must be a positive int, got {num_tokens!r}; pass e.g. "
                                f"num_tokens=20")
        if init not in SOFT_INITS:
            raise TemplateError(f"init={init!r} is unknown; use one of {', '.join(SOFT_INITS)}, or pass "
                                f"init_text='...' to start from the embeddings of some words")
        parse_template(text)                       # errors name columns of the caller's text
        if tokenizer is None:
            raise TemplateError("a template needs a tokenizer; pass tokenizer=... (the one returned by "
                                "pd.load_backbone)")
        weight = _embedding_weight(backbone)
        prefix = _prompt_tuning_init(tokenizer, weight, num_tokens, init, init_text)
        super().__init__(text, tokenizer, backbone, post_processing=post_processing, kind=kind,
                         prefix_init=prefix)
        self.num_tokens = num_tokens


class PtuningTemplate(MixedTemplate):
    """P-tuning v1 (Liu et al. 2021): the soft pieces' vectors come from a trained prompt encoder.

    ``prompt_encoder="lstm"``: h = MLP(BiLSTM(e_1 .. e_N)), a 2-layer bidirectional LSTM over the soft
    tokens in template order, then Linear-ReLU-Linear (the paper's encoder, so the soft tokens depend on
    each other). ``"mlp"``: h_i = MLP(e_i). The raw vectors e (``soft_embeds``) and the encoder are trained.
    """

    def __init__(self, text: str, tokenizer: Any, backbone: Any, prompt_encoder: str = "lstm",
                 post_processing: Mapping[str, Callable[[str], str]] | None = None,
                 kind: str | None = None) -> None:
        if prompt_encoder not in PROMPT_ENCODERS:
            raise TemplateError(f"prompt_encoder={prompt_encoder!r} is unknown; use one of "
                                f"{', '.join(PROMPT_ENCODERS)}")
        super().__init__(text, tokenizer, backbone, post_processing=post_processing, kind=kind)
        if self.num_soft_tokens == 0:
            raise TemplateError(f'template {self.text!r} has no soft piece for the prompt encoder; add '
                                f'{{"soft"}} pieces, e.g. \'{{"placeholder":"text_a"}} {{"soft"}} {{"soft"}} '
                                f'{{"mask"}}\', or use ManualTemplate')
        self.prompt_encoder = prompt_encoder
        h = self.soft_embeds.shape[1]
        width = 2 * (h // 2) if prompt_encoder == "lstm" else h
        self.lstm = (nn.LSTM(h, h // 2, num_layers=2, bidirectional=True, batch_first=True)
                     if prompt_encoder == "lstm" else None)
        self.mlp = nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Linear(h, h))
        self.to(self.soft_embeds)

    def soft_vectors(self) -> torch.Tensor:
        """h = MLP(BiLSTM(e)) or MLP(e): (N, H)."""
        x = self.soft_embeds                                                     # (N, H)
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)                          # (N, 2 * (H // 2))
        return self.mlp(x)                                                       # (N, H)


def _embedding_weight(backbone: Any) -> torch.Tensor:
    """The backbone's word-embedding matrix (V, H), detached (the template does not keep the backbone)."""
    if isinstance(backbone, nn.Embedding):
        return backbone.weight.detach()
    for getter in ("input_embeddings", "get_input_embeddings"):
        if callable(getattr(backbone, getter, None)):
            return getattr(backbone, getter)().weight.detach()
    raise TemplateError(f"a soft template needs the backbone to size and initialise its vectors, got "
                        f"{type(backbone).__name__}; pass backbone=model (from pd.load_backbone)")


def _random_rows(n: int, weight: torch.Tensor) -> torch.Tensor:
    """n vectors from N(0, std(E)^2): the scale of the word embeddings whatever the family. (n, H)"""
    std = weight.float().std().item()
    return torch.randn(n, weight.shape[1], device=weight.device).mul_(std).to(weight.dtype)


def _prompt_tuning_init(tokenizer: Any, weight: torch.Tensor, n: int, init: str,
                        init_text: str | None) -> torch.Tensor:
    """Initial prompt vectors (n, H) for SoftTemplate."""
    if init_text is not None:
        ids = list(tokenizer(init_text, add_special_tokens=False)["input_ids"]) if init_text.strip() else []
        if not ids:
            raise TemplateError(f"init_text={init_text!r} tokenises to nothing; pass some words, or "
                                f"init_text=None")
        return weight[[ids[i % len(ids)] for i in range(n)]].clone()
    if init == "random":
        return _random_rows(n, weight)
    cands = _vocab_candidates(tokenizer, weight.shape[0])
    picks = cands[torch.randint(len(cands), (n,))]
    return weight[picks.to(weight.device)].clone()


def _vocab_candidates(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Ids of ordinary tokens: not special, not bracketed like [unused3] / <extra_id_0>."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    size = min(vocab_size, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    keep = [i for i, t in enumerate(tokens) if i not in special and t
            and not (t[0] in "[<" and t[-1] in "]>" and len(t) > 2)]
    return torch.tensor(keep or list(range(size)), dtype=torch.long)


def _check_reuse(piece: Piece, first_column: int, text: str) -> None:
    """A later piece with an already defined soft_id reuses its vectors and may not redefine them."""
    if piece.value is not None or piece.duplicate is not None:
        raise TemplateError(f"soft_id {piece.soft_id} at column {piece.column} of {text!r} is already defined "
                            f"at column {first_column}; a later piece with that soft_id reuses those vectors, "
                            f'so write it as {{"soft_id": {piece.soft_id}}} (no text, no duplicate)')


def _checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() or path.suffix == "" else path


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with errors that say what to do."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MissingFileError(f"template checkpoint {str(path)!r} does not exist; pass the file written by "
                               f"template.save() (or its folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); save it again with "
                              f"template.save()") from None


# --- registry: how the builder makes the soft templates, and the options a classifier folder rebuilds them from --
def _build_mixed(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> MixedTemplate:
    text, kw = template_text(options, MixedTemplate)
    return MixedTemplate(text, tokenizer=tokenizer, backbone=backbone, **kw)


def _build_soft(tokenizer: Any, classes: list[str] | None, options: dict[str, Any], backbone: Any) -> SoftTemplate:
    options.setdefault("text", DEFAULT_SOFT_TEXT)
    text, kw = template_text(options, SoftTemplate)
    return SoftTemplate(text, tokenizer=tokenizer, backbone=backbone, **kw)


def _build_ptuning(tokenizer: Any, classes: list[str] | None, options: dict[str, Any],
                   backbone: Any) -> PtuningTemplate:
    text, kw = template_text(options, PtuningTemplate)
    return PtuningTemplate(text, tokenizer=tokenizer, backbone=backbone, **kw)


def _export_soft(template: SoftTemplate) -> dict[str, Any]:
    # the prompt-tuning vectors are written before the text as one soft piece; the saved vectors replace the
    # initial ones on load, so the cheapest init is recorded
    head = f'{{"soft": null, "duplicate": {template.num_tokens}}} '
    return {"text": template.text[len(head):], "num_tokens": template.num_tokens, "init": "random",
            "kind": template.kind}


register_template("mixed", MixedTemplate, _build_mixed, lambda t: {"text": t.text, "kind": t.kind})
register_template("soft", SoftTemplate, _build_soft, _export_soft)
register_template("ptuning", PtuningTemplate, _build_ptuning,
                  lambda t: {"text": t.text, "prompt_encoder": t.prompt_encoder, "kind": t.kind})
