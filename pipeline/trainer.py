"""The single-process trainer: target worker -> experience -> learner step, in one loop.

It runs the same pieces the Ray pipeline distributes (``actors.TargetWorker`` makes
experiences, ``speculative.sft.sft_loss`` is the step), so what is tested here is what runs there.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from actors.target_worker import TargetWorker
from learners.objectives import objective_loss
from pipeline.checkpointing import load_state, open_run, save_checkpoint, set_rng_state
from pipeline.metrics_log import MetricsLog, plot_curves
from speculative.checkpoint import export_drafter, load_drafter, save_drafter
from speculative.config import ExperimentConfig, dump_config
from speculative.data import build_dataset, collate, mix_training_data, split_dataset
from speculative.data.batches import BatchOrder
from speculative.drafter import Eagle3Drafter
from speculative.drafter_blueprint import apply_ttt_settings, make_blueprint
from speculative.evaluation import evaluate_ttt, mean_metrics
from speculative.experience import uses_reference
from speculative.profiling import phase
from speculative.runtime import adamw_with_schedule, pick_device, seed_everything, target_dtype
from speculative.target import TargetModel, default_cache_dir, load_tokenizer, resolve_target, verifier_id


def load_datasets(config, tokenizer, cache_dir: Path):
    """(train, evaluation, stats) of ``config.data``, tokenised and cached under ``cache_dir/data``.

    Shared by the single-process trainer and the Ray driver (which may hold no GPU, so it does
    not build a Trainer). An empty evaluation split falls back to the training set (the main
    source's, without ``data.extra_sources``).
    """
    data = config.data

    def tokenised(source: str, format: str, max_records: int | None, offset: int):
        return build_dataset(
            source, tokenizer, format=format, split=data.split, subset=data.subset, num_proc=data.num_proc,
            max_length=data.max_length, max_records=max_records, offset=offset, on_error=data.on_error,
            cache_dir=Path(cache_dir) / "data",
        )

    dataset, stats = tokenised(data.source, data.format, data.max_records, data.offset)
    train, evaluation = split_dataset(dataset, data.eval_fraction, config.seed)
    held_out = evaluation if len(evaluation) else None
    main_train = train  # the fallback evaluation: the main text only, as a held-out split would be
    if data.extra_sources:
        extras, names = [], {data.source}
        for extra in data.extra_sources:
            extra_set, extra_stats = tokenised(extra.source, extra.format, extra.max_records, extra.offset)
            name = extra.source
            if name in names:  # another slice of a file already in the mix: its own statistics
                end = "" if extra.max_records is None else extra.offset + extra.max_records
                name = f"{extra.source}[{extra.offset}:{end}]"
            names.add(name)
            extras.append((name, extra_set))
            stats.setdefault("extra_source_stats", {})[name] = extra_stats
        train, stats["training_mix"] = mix_training_data(train, held_out, extras, data.source)
        for part in stats["training_mix"]["parts"]:
            print(f"[draftrl] training mix: {part['source']}: {part['samples']} samples, {part['tokens']} tokens "
                  f"({100 * part['token_share']:.1f} %)", flush=True)
    return train, held_out if held_out is not None else main_train, stats


class NonFiniteGuard:
    """Skips NaN/inf losses and gradients, counts them, and aborts after ``limit`` of them.

    One bad batch (a corrupt sample, an overflow) should not kill a multi-hour run, nor poison
    the weights; a run that keeps producing them is broken and must stop with a clear error.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.skipped = 0

    def skip(self, value: torch.Tensor, what: str) -> bool:
        if bool(torch.isfinite(value).all()):
            return False
        self.skipped += 1
        print(f"[draftrl] skipped non-finite {what} = {float(value.detach())} ({self.skipped} of at most "
              f"{self.limit}: training.max_nonfinite)", flush=True)
        if self.skipped > self.limit:
            raise FloatingPointError(
                f"{what} is {float(value.detach())}: {self.skipped} non-finite losses/gradients, more than "
                f"training.max_nonfinite = {self.limit}; the run stops (resume from the last checkpoint "
                "after fixing the data or lowering training.lr)")
        return True


@dataclass
class TrainState:
    """What a training step reads and advances (``Trainer.start`` builds it, ``Trainer.train_step``
    steps it). ``step``, ``cursor`` (the next batch of ``order``) and the optimizer, schedule and
    ``nonfinite`` count are checkpointed; ``tokens`` counts the real tokens this process stepped."""

    drafter: Eagle3Drafter
    reference: Eagle3Drafter | None  # GTO's frozen reference drafter
    worker: TargetWorker
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: Any  # the training dataset
    order: BatchOrder
    pad_id: int
    nonfinite: NonFiniteGuard
    step: int = 0
    cursor: int = 0
    tokens: int = 0


@dataclass
class RunResult:
    output_dir: Path
    drafter_dir: Path
    final_step: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]


class Trainer:
    def __init__(
        self,
        config: ExperimentConfig,
        resume: bool = False,
        steps_this_run: int | None = None,
        minutes_this_run: float | None = None,
    ):
        """``steps_this_run``/``minutes_this_run`` stop early with a checkpoint (GPU time comes in
        slots); ``resume`` continues from it with the same schedule and data order."""
        self.config = config
        self.resume = resume
        self.steps_this_run = steps_this_run
        self.minutes_this_run = minutes_this_run
        self.out = Path(config.output_dir)
        self.cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        self.device = pick_device(config.training.device)
        if config.training.threads:
            torch.set_num_threads(config.training.threads)

    # -- set-up ---------------------------------------------------------------------------
    def _target_dtype(self) -> torch.dtype:
        return target_dtype(self.config.target.dtype, self.device)

    def _load_data(self, tokenizer):
        return load_datasets(self.config, tokenizer, self.cache_dir)

    def _load_target(self):
        cfg = self.config
        print(f"[draftrl] loading target '{cfg.target.model}' on {self.device}", flush=True)
        target = TargetModel.load(
            cfg.target.model, cfg.target.aux_layer_ids, self._target_dtype(), self.device, self.cache_dir
        )
        return target, load_tokenizer(cfg.target.model, self.cache_dir)

    def _new_drafter(self, target: TargetModel, train) -> Eagle3Drafter:
        """``drafter.init_from``, else a seeded drafter over a draft vocabulary from the data:
        the same blueprint the Ray driver ships to its learners and rollout actors."""
        target_path = resolve_target(self.config.target.model, self.cache_dir)
        return make_blueprint(self.config, target_path, train).build(target.embed_tokens.weight)

    def _reference(self, drafter: Eagle3Drafter, target: TargetModel, checkpoint: Path | None):
        """GTO's frozen reference drafter: the starting drafter, or the checkpoint's copy."""
        if not uses_reference(self.config.training.objective):
            return None
        if checkpoint is not None:
            reference = load_drafter(checkpoint / "reference", target.embed_tokens.weight.float())
        else:
            reference = copy.deepcopy(drafter)
        return reference.float().to(self.device).eval().requires_grad_(False)

    def start(self, target: TargetModel, tokenizer, train, checkpoint: Path | None = None) -> TrainState:
        """The drafter (``checkpoint``'s, else a new one), its optimizer, schedule and batch order, at
        step 0 or where ``checkpoint`` stopped (its optimizer, schedule, cursor, skip count and RNG)."""
        cfg, train_cfg = self.config, self.config.training
        if checkpoint is not None:
            drafter = load_drafter(checkpoint / "drafter", target.embed_tokens.weight.float())
        else:
            drafter = self._new_drafter(target, train)
        drafter.to(self.device)
        apply_ttt_settings(drafter, train_cfg)
        reference = self._reference(drafter, target, checkpoint)
        worker = TargetWorker(target, drafter.draft_to_target)
        optimizer, scheduler = adamw_with_schedule(drafter.trainable_parameters(), train_cfg)
        state = TrainState(
            drafter, reference, worker, optimizer, scheduler, train,
            order=BatchOrder(len(train), train_cfg.batch_size, cfg.seed,
                             lengths=train.lengths if train_cfg.group_by_length else None),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            nonfinite=NonFiniteGuard(train_cfg.max_nonfinite),
        )
        if checkpoint is not None:
            saved = load_state(checkpoint)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state.step, state.cursor = saved["step"], saved["cursor"]
            state.nonfinite.skipped = int(saved.get("skipped_nonfinite", 0))
            set_rng_state(saved["rng"])
        return state

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg, train_cfg = self.config, self.config.training
        seed_everything(cfg.seed)
        checkpoint = open_run(self.out, self.resume, dump_config(cfg))

        target, tokenizer = self._load_target()
        train, evaluation, stats = self._load_data(tokenizer)
        (self.out / "data_stats.json").write_text(json.dumps(stats, indent=2, default=str))
        print(f"[draftrl] data: {len(train)} train / {len(evaluation)} eval samples; {stats}", flush=True)

        state = self.start(target, tokenizer, train, checkpoint)
        if checkpoint is not None:
            print(f"[draftrl] resumed from {checkpoint} at step {state.step}", flush=True)
        step, drafter, worker, pad_id = state.step, state.drafter, state.worker, state.pad_id

        log = MetricsLog(self.out, cfg.tracking, cfg.name, cfg.model_dump(mode="json"))
        window: list[dict[str, float]] = []
        train_metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        bar = tqdm(total=train_cfg.max_steps, initial=step, desc=train_cfg.objective, dynamic_ncols=True)
        started = time.time()
        stop_at = train_cfg.max_steps
        if self.steps_this_run is not None:
            stop_at = min(stop_at, step + self.steps_this_run)
        if step == 0:  # the starting point of the curves
            eval_metrics = self.evaluate(drafter, worker, evaluation, pad_id)
            log.log(0, "eval", eval_metrics)
        while step < stop_at:
            merged = self.train_step(state)
            if merged is None:
                continue  # no update: the same step is tried again on the next batches
            step = state.step
            if self.minutes_this_run is not None and time.time() - started > 60 * self.minutes_this_run:
                stop_at = step  # out of time: checkpoint and export below
            window.append(merged)
            bar.update(1)
            bar.set_postfix(_postfix(merged))
            if step % train_cfg.log_every == 0 or step == stop_at:
                train_metrics = mean_metrics(window)
                train_metrics["tokens_per_s"] = state.tokens / max(1e-9, time.time() - started)
                log.log(step, "train", train_metrics)
                window = []
            if step % train_cfg.eval_every == 0 or step == stop_at:
                eval_metrics = self.evaluate(drafter, worker, evaluation, pad_id)
                log.log(step, "eval", eval_metrics)
                tqdm.write(
                    f"[draftrl] step {step}: eval TTT loss {eval_metrics['loss']:.4f} "
                    f"top1 step1 {eval_metrics['top1/step1']:.3f} "
                    f"accept-length proxy {eval_metrics['accept_length_proxy']:.3f}"
                )
            if step % train_cfg.save_every == 0 or step == stop_at:
                saved = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                         "cursor": state.cursor, "skipped_nonfinite": state.nonfinite.skipped}
                extra = {"reference": state.reference} if state.reference is not None else {}
                save_checkpoint(self.out / "checkpoints", step, drafter, saved, train_cfg.keep_checkpoints, extra)
        bar.close()
        log.close()

        drafter_dir = save_drafter(
            drafter, self.out / "drafter", dtype=torch.bfloat16,
            metadata={"step": step, "target": cfg.target.model, "objective": train_cfg.objective,
                      "verifier_architectures": list(getattr(target.config, "architectures", None) or [])},
            verifier=verifier_id(cfg.target.model),
        )
        for fmt in cfg.drafter.export_formats:  # the same weights in other tools' layouts
            export_drafter(drafter_dir, self.out / f"drafter_{fmt}", fmt, speculative_tokens=train_cfg.ttt_steps)
        plot_curves(log.path, self.out / "curves.png", train_cfg.ttt_steps)
        return RunResult(self.out, drafter_dir, step, train_metrics, eval_metrics)

    def train_step(self, state: TrainState) -> dict[str, float] | None:
        """One update: ``grad_accum`` micro-batches (experience, loss, backward), gradient clipping,
        optimizer and schedule. Returns its metrics, or None when non-finite losses/gradients left
        nothing to apply (``state.step`` stays: the next call tries the step on the next batches).

        ``bench/sft_profile.py`` profiles this very step: the ``phase`` ranges (``SFT_PHASES``) are
        no-ops unless a profile records."""
        cfg, train_cfg = self.config, self.config.training
        drafter, reference, worker, nonfinite = state.drafter, state.reference, state.worker, state.nonfinite
        drafter.train()
        state.optimizer.zero_grad(set_to_none=True)
        step_metrics: list[dict[str, float]] = []
        refresh = cfg.gto.reference_refresh_every
        if reference is not None and refresh and state.step > 0 and state.step % refresh == 0:
            reference.load_state_dict(drafter.state_dict())
        # opd.rollout_per_update: the whole update's prompts in one batched rollout, split
        # into the grad_accum micro-batches the backward passes take.
        shared = None
        if train_cfg.objective == "opd" and cfg.opd.rollout_per_update and train_cfg.grad_accum > 1:
            from actors.opd_rollout import split_experience

            merged = collate([state.train[i] for c in range(state.cursor, state.cursor + train_cfg.grad_accum)
                              for i in state.order.indices(c)], state.pad_id)
            shared = split_experience(worker.make_experience(
                cfg, merged, drafter, reference, drafter_version=state.step,
                seed=cfg.seed * 1_000_003 + state.cursor,
            ), train_cfg.grad_accum)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for micro in range(train_cfg.grad_accum):
            if shared is not None:
                experience = shared[micro]
            else:
                with phase("sft/collate"):
                    batch = collate([state.train[i] for i in state.order.indices(state.cursor)], state.pad_id)
                # Rollouts run the drafter in fp32, outside autocast: CUDA-graph capture and
                # autocast's weight cache do not mix, and the drafter is small.
                experience = worker.make_experience(
                    cfg, batch, drafter, reference, drafter_version=state.step,
                    seed=cfg.seed * 1_000_003 + state.cursor,
                )
            state.cursor += 1
            state.tokens += experience.num_tokens
            with phase("sft/ttt_forward"), autocast:
                loss, metrics = objective_loss(drafter, experience, cfg)
            with phase("sft/backward"):
                if nonfinite.skip(loss, f"step {state.step} batch {state.cursor - 1}: loss"):
                    continue  # this batch contributes nothing
                (loss / train_cfg.grad_accum).backward()
            step_metrics.append(metrics)
        with phase("sft/optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(drafter.trainable_parameters(), train_cfg.grad_clip)
            if not step_metrics or nonfinite.skip(grad_norm, f"step {state.step}: gradient norm"):
                return None
            state.optimizer.step()
            state.scheduler.step()
        state.step += 1
        merged = mean_metrics(step_metrics)
        merged.update(grad_norm=float(grad_norm), lr=state.scheduler.get_last_lr()[0],
                      skipped_nonfinite=float(nonfinite.skipped))
        return merged

    def evaluate_directory(self, drafter_dir: Path) -> dict[str, float]:
        """Held-out TTT metrics of a saved drafter on this config's eval split."""
        target, tokenizer = self._load_target()
        _, evaluation, _ = self._load_data(tokenizer)
        drafter = load_drafter(drafter_dir, target.embed_tokens.weight.float(), target.aux_layer_ids)
        drafter = drafter.float().to(self.device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return self.evaluate(drafter, TargetWorker(target, drafter.draft_to_target), evaluation, pad_id)

    def evaluate(self, drafter: Eagle3Drafter, worker: TargetWorker, dataset, pad_id: int) -> dict[str, float]:
        """Held-out TTT metrics over the first ``eval_batches`` batches (a fixed set)."""
        return evaluate_ttt(drafter, worker, dataset, pad_id, self.config.training)


def _postfix(metrics: dict[str, float]) -> dict[str, str]:
    keys = ("loss", "top1/step1", "gto/reward", "gto/clip_fraction", "rollout/tau")
    return {k.split("/")[-1] if k != "rollout/tau" else "tau": f"{metrics[k]:.3f}" for k in keys if k in metrics}
