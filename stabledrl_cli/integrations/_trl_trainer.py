"""`RecordingTrainer`, what the recording TRL trainers (1.16.x) share: `RecordingGRPOTrainer`
(in `_trl_grpo`) and `RecordingRLOOTrainer` (in `_trl_rloo`) each record every optimizer step.

The overrides are minimal and call the parent; what each one reads (TRL's source, 1.16; the
GRPO and RLOO trainers share these methods):
- `_calculate_rewards`: the rewards of the generation batch, gathered over ranks;
- `_generate_and_score_completions`: tags each row with its global prompt-group id and reward
  (per-row tensors travel with the rows through TRL's shuffle and split), and notes the
  optimizer steps taken so far (a step's inner_step: the steps taken since its first
  micro-batch's rollout);
- `_compute_loss` (per micro-batch), with `_get_per_token_logps_and_entropies` read while it
  runs (GRPO's also `get_high_entropy_mask` and `get_off_policy_mask`): the current
  log-probs, the masks TRL multiplied into the loss, and TRL's normaliser;
- `_get_grad_norm` (once per optimizer step, before `optimizer.step()`): the pre-clip norm,
  and the values TRL's metrics (`_metrics["train"]`) took during the step, every one of them
  appended by then; the step is logged here as `state.global_step + 1`, the number
  `log_history` gives it.
The run is opened by a callback's `on_step_begin` of the first step (`_RunOpener`), once TRL
has loaded all of the checkpoint it resumes (its RNG state comes after `on_train_begin`).
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

import torch

from stabledrl_cli.capture._status import RecordingFailure
from stabledrl_cli.capture.bootstrap import ENV_POLICY, integration_records, recorded_into
from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._file_names import MANIFEST_NAME
from stabledrl_cli.dump._recorder_args import checked_reward_range
from stabledrl_cli.dump._setup import RunNotEmpty, remove_stepless_run
from stabledrl_cli.dump._training_end import normal_end
from stabledrl_cli.errors import (
    SPEC_QUOTE_LIMIT,
    InputError,
    UsageError,
    WriteError,
    key_shown,
    warn,
)
from stabledrl_cli.integrations._trl_capture import MicroBatch, StepBuffer
from stabledrl_cli.integrations._trl_run_dir import resume_step, run_dir
from stabledrl_cli.integrations._trl_version import check_trl_version
from stabledrl_cli.policies import Policy, get_policy
from stabledrl_cli.spec import plain_number
from stabledrl_cli.vocab import Unit

GROUP_KEY = "stabledrl_group_id"
REWARD_KEY = "stabledrl_reward"

# TRL's own annotations are partial; the recording classes treat their bases as untyped.
TRL: Any = importlib.import_module("trl")
_TrainerCallback: Any = importlib.import_module("transformers").TrainerCallback
_Untyped: Any = object
"""`RecordingTrainer`'s base as mypy sees it: the TRL trainer that follows it in a recording
class's MRO (at run time, object)."""


_RECORDED: set[str] = set()
"""The run directories (real paths) a recording trainer's train() has opened in this
process."""


def cpu_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of what a TRL loss used, detached, as float32 on the CPU (what a step stores)."""
    return tensor.detach().to("cpu", torch.float32)


class RecordingTrainer(_Untyped):  # type: ignore[misc]
    """What a recording TRL trainer shares, placed before the TRL trainer in its bases:
    `class RecordingXTrainer(RecordingTrainer, trl.XTrainer)` with the trainer's own
    `_sd_trainer`, `_sd_policy`, `_sd_meta` and `_sd_micro_batch` (and `_sd_unit` for a
    sequence-level loss).

    Arguments: those of the TRL trainer, plus `stabledrl_out` (the run directory; default
    $STABLEDRL_RUN_DIR from `stabledrl record --out DIR -- ...`), `stabledrl_overwrite`
    (replace an existing run: True or False) and `stabledrl_reward_range` ((low, high) the
    reward spans, (0, 1) for a success rate: the collapse rule's floor; a resumed run keeps
    its own). Raises UsageError at construction when there is no run directory,
    `stabledrl_out` is another one than record's --out, the range is no (low, high), or the
    configuration cannot be expressed by the catalogue (refused from the arguments, before the
    TRL trainer loads the model or creates its output directory). An MoE model's router loss,
    which TRL adds to the policy's, is recorded apart (`_sd_router_term`).
    """

    _sd_trainer: str
    """The TRL trainer's name (the manifest's `meta.trainer`)."""
    _sd_unit: Unit = "token"
    """What one recorded entry is: a token, or a sequence (the Recorder's `unit`)."""

    def __init__(
        self,
        *args: Any,
        stabledrl_out: str | os.PathLike[str] | None = None,
        stabledrl_overwrite: bool = False,
        stabledrl_reward_range: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> None:
        trainer = type(self).__name__
        self.stabledrl_out, forced = run_dir(stabledrl_out, stabledrl_overwrite, trainer)
        # record's --force: the Recorder takes it, once for the command (`_run_env.forced_run`)
        self._sd_overwrite = True if stabledrl_overwrite else (None if forced else False)
        self._sd_reward_range = (
            None
            if stabledrl_reward_range is None
            else checked_reward_range(stabledrl_reward_range, "stabledrl_reward_range")
        )
        try:
            given = inspect.signature(super().__init__).bind(*args, **kwargs).arguments
        except TypeError:
            given = {}  # arguments the TRL trainer refuses itself, saying why
        self._sd_check_arguments(given)
        integration_records()  # the optimizer hooks of `stabledrl record` stand down
        self._sd_buffer: StepBuffer | None = None
        self._sd_seen: dict[str, torch.Tensor] | None = None
        self._sd_rewards: torch.Tensor | None = None
        self._sd_groups = 0
        self._sd_rollout_step = 0
        """The optimizer steps taken when TRL generated the rollout its micro-batches use now
        (the latest): a micro-batch's inner_step counts the steps taken since."""
        self._sd_new_run = False
        """Whether the open run is a new one-rank run (removed when train() raises before its
        first step)."""
        self._sd_begins: tuple[str, int | None] | None = None
        """(run directory's real path, checkpoint step) of the run train() opens as its
        first step begins (`_sd_begin`)."""
        super().__init__(*args, **kwargs)
        self.stabledrl_policy = self._sd_policy()
        self._sd_note_record_policy()
        self.add_callback(_RunOpener(self))

    # -- what each recording trainer says for itself ------------------------------------------
    def _sd_check_arguments(self, given: dict[str, Any]) -> None:
        """UsageError, one line, when the TRL trainer's arguments (`given`, by name) make a loss
        the catalogue cannot express: checked before the TRL trainer loads a model or creates
        its output directory."""

    def _sd_policy(self) -> Policy:
        """The catalogue policy that reproduces the trainer's loss (its config); UsageError,
        one line, when there is none."""
        raise NotImplementedError

    def _sd_meta(self) -> dict[str, Any]:
        """The manifest's `meta` entries of this trainer's config, beside the shared ones."""
        raise NotImplementedError

    def _sd_micro_batch(
        self, inputs: dict[str, Any], loss: torch.Tensor, seen: dict[str, torch.Tensor]
    ) -> MicroBatch:
        """What `_compute_loss` used for one micro-batch (`loss`, its return; `seen`, the
        tensors read while it ran), on CPU."""
        raise NotImplementedError

    def _sd_router_meta(self) -> dict[str, float]:
        """The manifest's `meta.router_aux_loss_coef`: the coefficient of the MoE router loss
        TRL adds (an MoE model's, unless the TRL config sets it: 0 adds none); {} without
        one."""
        if not self.aux_loss_enabled:
            return {}
        return {"router_aux_loss_coef": float(self.router_aux_loss_coef)}

    def _sd_router_term(self, aux_loss: float) -> float:
        """The term of a micro-batch's recorded loss that is the MoE router's load-balancing
        loss `aux_loss`: `router_aux_loss_coef` times it, over the gradient accumulation
        steps (GRPO's loss divides it so; RLOO's is divided whole by the HF Trainer, as its
        recorded loss is): the micro-batch's part of the step's `loss_aux`."""
        accumulation = float(self.current_gradient_accumulation_steps)
        return float(self.router_aux_loss_coef) * aux_loss / accumulation

    # -- the run ----------------------------------------------------------------------------
    def _sd_open(self, resume: int | None) -> StepBuffer:
        """The run continued after step `resume` (the checkpoint's), else a new one."""
        policy = self.stabledrl_policy
        args = self.args
        meta = {
            "source": "trl",
            "trl_version": check_trl_version(),
            "trainer": self._sd_trainer,
            "num_generations": args.num_generations,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "steps_per_generation": args.steps_per_generation,
            "num_iterations": args.num_iterations,
            "max_completion_length": args.max_completion_length,
            # TRL's float32 weights, as the config wrote them (0.1, not 0.10000000149011612)
            "reward_weights": [plain_number(w) for w in self.reward_weights.cpu().numpy()],
            **self._sd_router_meta(),
            **self._sd_meta(),
        }
        if resume is not None and not (self.stabledrl_out / MANIFEST_NAME).is_file():
            resume = None  # no run here to continue: a new one, from the checkpoint's next step
        world_size = self.accelerator.num_processes
        self._sd_new_run = resume is None and world_size == 1
        recorder = Recorder(
            self.stabledrl_out,
            policy=policy,
            meta=meta,
            unit=self._sd_unit,
            world_size=world_size,
            rank=self.accelerator.process_index,
            overwrite=self._sd_overwrite if resume is None else False,
            group_ids="global",
            reward_range=self._sd_reward_range,
            on_write_error="warn",
            resume=resume is not None,
            resume_from=None if resume is None else resume + 1,
        )
        return StepBuffer(recorder, group_size=self.num_generations)

    def _sd_recording(self) -> bool:
        return self._sd_buffer is not None and not self._sd_buffer.failed and self.model.training

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """The TRL trainer's `train`, recording into the run directory (continued on resume, or
        begun at the checkpoint's next step when the directory holds no run). A run that
        cannot be written (a full or read-only disk) or continued (a corrupt step before the
        checkpoint's, a resume by another policy or world size than the run's), or a
        checkpoint whose trainer_state.json it cannot read (`resume_step`), warns once and
        training runs unrecorded, the run left as it was; a new run into a directory that
        holds one (without `stabledrl_overwrite`) is refused, UsageError. A second train()
        into a run directory this process has recorded into (of this trainer or of another)
        that does not resume numbers its steps from 1 again: it warns once and runs
        unrecorded, the first one's steps kept; so does a train() under `stabledrl record`
        whose process recorded steps into record's run before (the optimizer hooks' steps of
        a warm-up), those steps kept. The run is opened as TRL's first step begins,
        once TRL has loaded all of the checkpoint it resumes: a resume that TRL refuses (no
        checkpoint there, one it cannot load, its RNG state included) leaves the run
        directory as it is, and so does a new run's training (of one rank) that raises
        before its first step is recorded: the run opened for it is removed. A training that
        an exception ends after that (Ctrl-C, an error; not sys.exit(0)) notes how in the run
        (`Recorder.note_interrupted`), as a with-Recorder block does."""
        resume: int | None = None
        unrecorded = False
        try:
            resume = resume_step(self, resume_from_checkpoint)
        except OSError:  # TRL's train() refuses it, saying why
            unrecorded = True
        except InputError as exc:
            RecordingFailure().fail(exc, "recording the resumed training")
            unrecorded = True
        if unrecorded:  # out of the except: TRL's own error is not shown as a sequel of ours
            return super().train(resume_from_checkpoint, *args, **kwargs)
        directory = os.path.realpath(self.stabledrl_out)
        refusal = self._sd_refusal(directory, resume)
        if refusal is not None:
            RecordingFailure().fail(*refusal)
            return super().train(resume_from_checkpoint, *args, **kwargs)
        self._sd_begins = (directory, resume)
        cut: BaseException | None = None
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            self._sd_new_run = False  # a training that ends keeps its run, stepless or not
            return output
        except BaseException as exc:
            cut = exc  # what ended the training: the run notes it as it closes
            raise
        finally:
            self._sd_begins = None
            buffer, self._sd_buffer = self._sd_buffer, None
            if buffer is not None:
                try:
                    if cut is not None and not normal_end(cut):
                        # a step recorded as its gradients were clipped, whose optimizer
                        # step raised (TRL counts it done once the step ends): not applied
                        last = buffer.recorder.last_step
                        unapplied = last is not None and last > self.state.global_step
                        buffer.recorder.note_interrupted(cut, unapplied=unapplied)
                    buffer.recorder.close()
                    if self._sd_new_run and buffer.recorder.last_step is None:
                        remove_stepless_run(self.stabledrl_out)  # raised before its first step
                        _RECORDED.discard(directory)
                except Exception as exc:
                    buffer.warn("the run's last steps", exc, self.state.global_step + 1)

    def _sd_note_record_policy(self) -> None:
        """One warning when `stabledrl record --policy SPEC` ($STABLEDRL_POLICY) names another
        policy than the trainer records: that spec is `log_policy_batch`'s, and the trainer
        records the loss TRL computes from its config."""
        given = os.environ.get(ENV_POLICY)
        if not given:
            return
        try:
            named = get_policy(given).spec
        except UsageError:
            named = given
        if named != self.stabledrl_policy.spec:
            warn(
                f"stabledrl: warning: record --policy {key_shown(given, SPEC_QUOTE_LIMIT)} "
                "is not what "
                f"{type(self).__name__} records: it records TRL's loss as its config makes "
                f"it, {self.stabledrl_policy.spec}\n"
            )

    def _sd_refusal(self, directory: str, resume: int | None) -> tuple[UsageError, str] | None:
        """(why, context) when train() cannot record into the run `directory` (its real
        path): this process recorded steps of `stabledrl record`'s run there before
        (`recorded_into`), or an earlier training of this process whose step numbers a
        train() that does not resume would start again; else None."""
        name = type(self).__name__
        if recorded_into(directory):
            return UsageError(
                f"{self.stabledrl_out} holds steps this process recorded before {name}'s "
                "train() (a warm-up's optimizer steps, say), beside which its steps, numbered "
                f"from 1, cannot go: `stabledrl record --no-optimizer-hooks` records {name}'s "
                "steps instead"
            ), "recording the run"
        if directory in _RECORDED and resume is None:
            return UsageError(
                f"{self.stabledrl_out} holds an earlier training of this process, whose "
                "step numbers a new train() starts again (resume_from_checkpoint= "
                "continues it)"
            ), "recording a second train()"
        return None

    def _sd_begin(self) -> None:
        """Opens the run train() asked for, as TRL's first step begins; a run that cannot be
        written (a full or read-only disk), or continued (a step it keeps is corrupt, or the
        resumed trainer records another policy or world size than the run's: the Recorder
        changes nothing), warns once and training runs unrecorded. A new run that would
        replace an existing one is refused (UsageError) before the step trains."""
        if self._sd_begins is None:
            return
        (directory, resume), self._sd_begins = self._sd_begins, None
        try:
            self._sd_buffer = self._sd_open(resume)
        except (WriteError, InputError, UsageError) as exc:
            if isinstance(exc, RunNotEmpty):  # (resume is None: a resume keeps the run)
                raise exc.advised(  # in the words of the trainer's arguments
                    "a later trainer continues it with train(resume_from_checkpoint="
                    "CHECKPOINT), or replaces it with stabledrl_overwrite=True",
                    "pass stabledrl_overwrite=True to replace the run, or continue it with "
                    "train(resume_from_checkpoint=CHECKPOINT)",
                ) from None
            if isinstance(exc, UsageError) and resume is None:
                raise
            RecordingFailure().fail(exc, "recording the run failed")
            return
        _RECORDED.add(directory)

    # -- rollout: groups and rewards --------------------------------------------------------
    def _calculate_rewards(self, *args: Any, **kwargs: Any) -> Any:
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._sd_rewards = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: Any) -> Any:
        output = super()._generate_and_score_completions(inputs)
        if self._sd_recording():
            self._sd_rollout_step = int(self.state.global_step)
            if self._sd_rewards is not None:
                assert self._sd_buffer is not None
                try:
                    self._sd_tag_rows(output, len(inputs))
                except Exception as exc:
                    step = self.state.global_step + 1
                    self._sd_buffer.warn("the rollout's groups and rewards", exc, step)
        return output

    def _sd_tag_rows(self, output: dict[str, Any], local_rows: int) -> None:
        """Adds each local row's global group id and reward (TRL: global rows g*G..g*G+G-1
        share a prompt; the rewards are gathered over ranks in rank order)."""
        per_func = self._sd_rewards
        assert per_func is not None
        weights = self.reward_weights.to(per_func.device).unsqueeze(0)
        rewards = (per_func * weights).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        start = self.accelerator.process_index * local_rows
        rows = torch.arange(start, start + local_rows, device=per_func.device)
        device = output["advantages"].device
        output[GROUP_KEY] = (self._sd_groups + rows // self.num_generations).to(device)
        output[REWARD_KEY] = rewards[rows].to(device)
        self._sd_groups += per_func.shape[0] // self.num_generations
        self._sd_rewards = None

    # -- loss: per micro-batch --------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._sd_seen is not None and "logp" not in self._sd_seen:
            self._sd_seen["logp"] = result[0].detach()
            if len(result) > 2 and isinstance(result[2], torch.Tensor):  # an MoE router loss
                self._sd_seen["aux_loss"] = result[2].detach()
        return result

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        if not self._sd_recording():
            return super()._compute_loss(model, inputs)
        assert self._sd_buffer is not None
        self._sd_seen = {}
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            seen, self._sd_seen = self._sd_seen, None
        try:
            inner = int(self.state.global_step) - self._sd_rollout_step
            micro = self._sd_micro_batch(inputs, loss, seen)
            if "aux_loss" in seen:
                micro.loss_aux = self._sd_router_term(float(seen["aux_loss"]))
            self._sd_buffer.add(micro, inner_step=inner)
        except Exception as exc:
            self._sd_buffer.warn("a micro-batch", exc, int(self.state.global_step) + 1)
        return loss

    # -- optimizer step ---------------------------------------------------------------------
    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self._sd_recording():
            assert self._sd_buffer is not None
            step = self.state.global_step + 1
            try:
                self._sd_buffer.log(
                    step,
                    grad_norm=float(norm),
                    max_grad_norm=float(self.args.max_grad_norm),
                    lr=float(self._get_learning_rate()),
                    metrics=self._metrics["train"],
                )
            except Exception as exc:
                self._sd_buffer.warn(f"step {step}", exc, step)
        return norm


class _RunOpener(_TrainerCallback):  # type: ignore[misc]
    """Opens a recording trainer's run at the first `on_step_begin` of a train(): transformers
    calls it once it has loaded all of the checkpoint that train() resumes (model, optimizer,
    scheduler and state before `on_train_begin`, the RNG state after it)."""

    def __init__(self, trainer: RecordingTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.trainer._sd_begin()  # the first one's: later ones find nothing to open
