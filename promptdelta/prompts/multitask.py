"""Multi-task prompts: structured templates shared across tasks, a task-mixing sampler, and one delta + one
soft prompt trained over several tasks (instruction-style multi-task prompt training; structured prompts
after Wang et al. 2022, "Towards Unified Prompt Tuning for Few-shot Text Classification" / UPT, and the
key-value format of Mishra et al. 2022, "Cross-Task Generalization via Natural Language Crowdsourcing
Instructions"; the mixing rate of Raffel et al. 2020, T5, Sec. 3.5.2).

Structured template: every task writes the same keys in the same order, only the values differ, e.g.

    [p_1 .. p_n] Task: sentiment. Format: review. Labels: bad, good. <text> Answer: [MASK].

p_1 .. p_n is ONE soft prompt (n, H), the same parameter in every task's template. Task mixing
(temperature-scaled proportional sampling, T = 1 proportional, T -> inf uniform):

    P(task t) = n_t^(1/T) / sum_s n_s^(1/T)          n_t: the task's training examples

Training: each step draws a task, a batch of it, and takes a step on that task's loss over the trainable
parameters: the deltas attached to the backbone (attach one first; the backbone is otherwise frozen here)
and the shared soft prompt. ``evaluate`` gives per-task accuracy; ``add_task`` + ``train(tasks=[new])``
transfers the learned delta and prompt to a new task.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from promptdelta.deltas.base import deltas_of
from promptdelta.errors import ConfigError, DataError, TemplateError
from promptdelta.prompts.lmbff import accuracy
from promptdelta.prompts.model import PromptForClassification
from promptdelta.prompts.soft import SoftTemplate
from promptdelta.prompts.verbalizer import ManualVerbalizer, Verbalizer

DEFAULT_KEYS = ("task", "format", "labels")
DEFAULT_BODY = '{"placeholder":"text_a","shortenable":true} Answer: {"mask"}.'


@dataclass
class TaskSpec:
    """One task: its data, classes, label words (one list per class), structured-field values (``fields``:
    e.g. {"task": "sentiment", "format": "review"}; "labels" defaults to the first label words) and, optionally,
    its own template ``body`` after the fields (tasks keep their usual templates; the fields are shared)."""

    name: str
    train: Sequence[Any]
    classes: Sequence[str]
    label_words: Sequence[Sequence[str]]
    dev: Sequence[Any] = ()
    fields: Mapping[str, str] = field(default_factory=dict)
    body: str | None = None            # this task's own template body (default: the MultiTaskPrompt's body)


def structured_text(fields: Mapping[str, str], keys: Sequence[str] = DEFAULT_KEYS, body: str = DEFAULT_BODY) -> str:
    """'Key: value.' for each key in the shared order, then the body (the template with input and mask)."""
    parts = []
    for key in keys:
        if key not in fields:
            raise TemplateError(f"the structured template needs a value for {key!r} (keys: {list(keys)}); add "
                                f"fields={{{key!r}: ...}} to the task")
        value = str(fields[key])
        if "{" in value or "}" in value:
            raise TemplateError(f"field {key}={value!r} contains a brace, which would open a template piece; "
                                f"write it without braces")
        parts.append(f"{key.capitalize()}: {value}.")
    return " ".join([*parts, body])


def mixing_weights(sizes: Mapping[str, int], temperature: float = 2.0) -> dict[str, float]:
    """P(task) = n_t^(1/T) / sum_s n_s^(1/T)."""
    if not sizes or any(n < 1 for n in sizes.values()):
        raise DataError(f"every task needs training examples; sizes: {dict(sizes)}")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature!r} must be > 0 (1: proportional, large: uniform)")
    w = {t: n ** (1.0 / temperature) for t, n in sizes.items()}
    total = sum(w.values())
    return {t: v / total for t, v in w.items()}


class TaskSampler:
    """Draws task names with the temperature-scaled proportional mixing rates (seeded)."""

    def __init__(self, sizes: Mapping[str, int], temperature: float = 2.0, seed: int = 13) -> None:
        self.weights = mixing_weights(sizes, temperature)
        self._rng = random.Random(seed)
        self._names, self._w = list(self.weights), list(self.weights.values())

    def sample(self) -> str:
        return self._rng.choices(self._names, weights=self._w)[0]


class MultiTaskPrompt(nn.Module):
    """One backbone (+ its deltas), one shared soft prompt, one structured template and verbalizer per task.

    Args:
        backbone, tokenizer: the model (attach a delta to it first) and its tokenizer.
        tasks: the tasks (``TaskSpec``).
        num_soft_tokens: n, the shared soft prompt's length.
        keys, body: the structured template's shared keys and its body (see ``structured_text``).
        readout, max_length: as for PromptForClassification ("mean" for sentence encoders without MLM head).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, tasks: Sequence[TaskSpec], num_soft_tokens: int = 8,
                 keys: Sequence[str] = DEFAULT_KEYS, body: str = DEFAULT_BODY, readout: str = "mask",
                 max_length: int = 128) -> None:
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.keys, self.body, self.readout, self.max_length = tuple(keys), body, readout, max_length
        self.num_soft_tokens = num_soft_tokens
        self.models = nn.ModuleDict()
        self.specs: dict[str, TaskSpec] = {}
        self.soft_prompt: nn.Parameter | None = None
        for spec in tasks:
            self.add_task(spec)

    def add_task(self, spec: TaskSpec, verbalizer: Verbalizer | None = None) -> PromptForClassification:
        """Add a task (a new one for transfer): its template shares the soft prompt and the backbone."""
        if spec.name in self.models:
            raise ConfigError(f"task {spec.name!r} is already added; give the new task another name")
        if len(spec.label_words) != len(spec.classes):
            raise ConfigError(f"task {spec.name!r} has {len(spec.classes)} classes but {len(spec.label_words)} "
                              f"label-word lists; give one list per class")
        fields = {"task": spec.name, "labels": ", ".join(ws[0] for ws in spec.label_words), **spec.fields}
        template = SoftTemplate(structured_text(fields, self.keys, spec.body or self.body), tokenizer=self.tokenizer,
                                backbone=self.backbone, num_tokens=self.num_soft_tokens)
        if self.soft_prompt is None:
            self.soft_prompt = template.soft_embeds                                  # (n, H), the shared one
        template.soft_embeds = self.soft_prompt                                      # tie: one parameter
        verbalizer = verbalizer or ManualVerbalizer(self.tokenizer, classes=list(spec.classes),
                                                    label_words=[list(w) for w in spec.label_words])
        clf = PromptForClassification(self.backbone, template, verbalizer, max_length=self.max_length,
                                      readout=self.readout)
        self.models[spec.name], self.specs[spec.name] = clf, spec
        return clf

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The backbone's delta parameters, the shared soft prompt and any verbalizer parameters."""
        params = [p for h in deltas_of(self.backbone).values() for p in h.parameters()]
        params.append(self.soft_prompt)
        params += [p for m in self.models.values() for p in m.verbalizer.parameters()]
        seen, out = set(), []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def train_steps(self, steps: int, lr: float = 1e-3, batch_size: int = 8, temperature: float = 2.0,
                    tasks: Sequence[str] | None = None, seed: int = 13) -> list[tuple[str, float]]:
        """``steps`` AdamW steps, each on one task drawn by the mixing sampler; returns (task, loss) per step."""
        names = list(tasks or self.models)
        unknown = [t for t in names if t not in self.models]
        if unknown:
            raise ConfigError(f"unknown tasks {unknown}; known: {list(self.models)}")
        sampler = TaskSampler({t: len(self.specs[t].train) for t in names}, temperature, seed)
        rng = random.Random(seed)
        params = self.trainable_parameters()
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        history = []
        self.train()
        for _ in range(steps):
            task = sampler.sample()
            clf, data = self.models[task], list(self.specs[task].train)
            loss, _ = clf.loss(clf.collate(rng.sample(data, min(batch_size, len(data)))))
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append((task, float(loss.detach())))
        self.eval()
        return history

    @torch.no_grad()
    def task_loss(self, task: str, split: str = "train") -> float:
        """Mean loss of one task on its train or dev split (eval mode)."""
        clf, data = self.models[task], self._split(task, split)
        was = clf.training
        clf.eval()
        loss = float(clf.loss(clf.collate(data))[0])
        clf.train(was)
        return loss

    def evaluate(self, split: str = "dev", tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Accuracy per task on ``split`` ("train" or "dev")."""
        out = {}
        for task in tasks or self.models:
            out[task] = accuracy(self.models[task], self._split(task, split))
        return out

    def _split(self, task: str, split: str) -> list[Any]:
        if split not in ("train", "dev"):
            raise ConfigError(f"split={split!r}: use 'train' or 'dev'")
        data = list(getattr(self.specs[task], split))
        if not data:
            raise DataError(f"task {task!r} has no {split} examples; pass {split}=... in its TaskSpec")
        return data
