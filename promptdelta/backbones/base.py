"""What every native backbone returns, and the attributes every native backbone has.

Contract (all families):
    model.family: str              # "bert", "roberta", "gpt2", "t5"
    model.kind: str                # "mlm" (masked LM), "clm" (causal LM), "seq2seq"
    model.config                   # a dataclass; model.config.hidden_size, vocab_size, pad_token_id
    model.input_embeddings()       # -> nn.Embedding (word embeddings; shared with a tied head)
    model.has_lm_head: bool        # True when the checkpoint carried an LM/MLM head
    model.forward(input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                  inputs_embeds=None, prefix_kv=None, output_hidden_states=False) -> BackboneOutput
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BackboneOutput:
    last_hidden_state: torch.Tensor                       # (B, T, H)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # (n_layers + 1) x (B, T, H), embeddings first
    logits: torch.Tensor | None = None                    # (B, T, V) when the model has an LM head
    pooler_output: torch.Tensor | None = None             # (B, H) when the model has a pooler
