"""What every process needs to build the same drafter without loading the whole target.

The driver decides the drafter's shape and draft vocabulary once (from the target's config and
the training data) and ships this small blueprint; learners read only the target's input
embedding from disk, rollout actors take it from the target they host anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from speculative.checkpoint import load_drafter, read_checkpoint
from speculative.config import TTT_ATTENTION_DEFAULT, TTT_VOCAB_LOSS_DEFAULT
from speculative.drafter import DrafterConfig, Eagle3Drafter, init_drafter_weights
from speculative.target import default_aux_layer_ids
from speculative.vocab import DraftVocab, load_vocab_mapping


@dataclass
class DrafterBlueprint:
    config: DrafterConfig
    draft_to_target: torch.Tensor  # the draft vocabulary
    init_from: str | None  # an EAGLE-3 directory, or None: seeded random init
    init_seed: int
    init_layout: str = "auto"  # how init_from's config.json is read (speculative.checkpoint_formats)
    ttt_attention: str = TTT_ATTENTION_DEFAULT  # training.attention, set on every drafter built
    ttt_vocab_loss: str = TTT_VOCAB_LOSS_DEFAULT  # training.vocab_loss, likewise

    def build(self, embed_weight: torch.Tensor, source: str | None = None) -> Eagle3Drafter:
        """The drafter in fp32: loaded from ``source`` (or ``init_from``), else seeded-initialised.

        Seeded initialisation is deterministic, so every process builds identical weights.
        """
        layout = self.init_layout if source in (None, self.init_from) else "auto"
        source = source or self.init_from
        if source:
            drafter = load_drafter(source, embed_weight.float(), self.config.aux_layer_ids, layout=layout)
            if not torch.equal(drafter.draft_to_target.cpu(), self.draft_to_target):
                raise ValueError(f"{source}: draft vocabulary differs from the run's")
            drafter = drafter.float()
        else:
            vocab = DraftVocab(self.draft_to_target.clone(), self.config.vocab_size)
            drafter = Eagle3Drafter(self.config, vocab, embed_weight.float())
            init_drafter_weights(drafter, seed=self.init_seed)
        drafter.ttt_attention, drafter.ttt_vocab_loss = self.ttt_attention, self.ttt_vocab_loss
        return drafter


def apply_ttt_settings(drafter_or_blueprint, training) -> None:
    """Copy the ``training`` section's training-time-test run settings (attention, vocab_loss) onto a
    drafter or a blueprint: the one place that lists them."""
    drafter_or_blueprint.ttt_attention = training.attention
    drafter_or_blueprint.ttt_vocab_loss = training.vocab_loss


def read_target_config(target_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(target_path)


def target_aux_layer_ids(config, target_config) -> tuple[int, ...]:
    return tuple(config.target.aux_layer_ids or default_aux_layer_ids(target_config.num_hidden_layers))


def blueprint_from_directory(directory: str, layout: str = "auto") -> DrafterBlueprint:
    """Shape and vocabulary of an existing drafter directory (any layout), read without a target."""
    path = Path(directory)
    drafter_config, weights, _ = read_checkpoint(path, layout)
    if "d2t" in weights:
        vocab = DraftVocab.from_d2t(weights["d2t"], drafter_config.vocab_size)
    else:
        vocab = DraftVocab(torch.arange(drafter_config.draft_vocab_size), drafter_config.vocab_size)
    return DrafterBlueprint(drafter_config, vocab.draft_to_target, str(path), 0, layout)


def make_blueprint(config, target_path: str, train_dataset) -> DrafterBlueprint:
    """The run's drafter: ``drafter.init_from`` if set, else a draft vocabulary from the data."""
    target_config = read_target_config(target_path)
    aux = target_aux_layer_ids(config, target_config)
    section = config.drafter
    mapping = None
    if section.vocab_mapping:  # an existing d2t/t2d from SpecForge or speculators
        mapping = load_vocab_mapping(section.vocab_mapping, target_config.vocab_size, section.t2d_mapping)
        if "draft_vocab_size" in section.model_fields_set and section.draft_vocab_size != mapping.size:
            raise ValueError(f"drafter.vocab_mapping {section.vocab_mapping} maps {mapping.size} draft tokens, "
                             f"drafter.draft_vocab_size is {section.draft_vocab_size}")
    if section.init_from:
        blueprint = blueprint_from_directory(section.init_from, section.init_layout)
        if tuple(blueprint.config.aux_layer_ids or aux) != aux:
            raise ValueError(
                f"drafter.init_from {section.init_from} fuses target layers "
                f"{blueprint.config.aux_layer_ids}, the target is set to {aux}"
            )
        if mapping is not None and not torch.equal(mapping.draft_to_target, blueprint.draft_to_target):
            raise ValueError(f"drafter.vocab_mapping {section.vocab_mapping} differs from the draft vocabulary "
                             f"of drafter.init_from {section.init_from}")
        blueprint.config.aux_layer_ids = aux
        apply_ttt_settings(blueprint, config.training)
        return blueprint
    from speculative.data import supervised_token_counts

    counts = supervised_token_counts(train_dataset, target_config.vocab_size)
    vocab = mapping or DraftVocab.from_counts(counts, section.draft_vocab_size)
    print(
        f"[draftrl] draft vocabulary{' (from ' + section.vocab_mapping + ')' if mapping else ''}: {vocab.size} of "
        f"{target_config.vocab_size} tokens, covering {vocab.coverage(counts):.2%} of supervised training tokens",
        flush=True,
    )
    drafter_config = DrafterConfig.from_target(target_config, vocab.size, aux, section.intermediate_size)
    blueprint = DrafterBlueprint(drafter_config, vocab.draft_to_target, None, section.init_seed)
    apply_ttt_settings(blueprint, config.training)
    return blueprint


def load_target_embedding(target_path: str, dtype: torch.dtype) -> torch.Tensor:
    """The target's input embedding, read alone from its safetensors (a learner needs no more).

    Cast through the target's dtype, then to fp32, exactly as a rollout actor's hosted target
    gives it, so both sides' drafters see the same (frozen) embedding.
    """
    from safetensors import safe_open

    path = Path(target_path)
    index = path / "model.safetensors.index.json"
    names = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight")
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        candidates = [(n, path / weight_map[n]) for n in names if n in weight_map]
    else:
        candidates = [(n, path / "model.safetensors") for n in names] if (path / "model.safetensors").is_file() else []
    for name, file in candidates:
        with safe_open(file, framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name).to(dtype).float()
    from transformers import AutoModelForCausalLM  # no safetensors: load the model, keep one tensor

    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=dtype)
    return model.get_input_embeddings().weight.detach().float().clone()
