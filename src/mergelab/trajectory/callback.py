"""A Hugging Face transformers TrainerCallback that keeps a weight average while training.

    from mergelab.trajectory.callback import AveragingCallback
    trainer = Trainer(..., callbacks=[AveragingCallback("ema", decay=0.999, warmup=True)])

After every optimizer step the callback folds the model's weights into a
`WeightAverager`; whenever the Trainer saves `checkpoint-<step>/`, the average
is saved beside the weights as `checkpoint-<step>/averaged/model.safetensors`
(with the model's config, so the folder loads with from_pretrained), and the
averager's own state as `averager.pt` so a resumed run continues the same
average. At the end of training `copy_to_model=True` writes the average into
the model.

Which average when:
- ema: long runs; the decay sets the window (about 1/(1-decay) steps); use
  warmup when averaging from the first step.
- swa: an equal-weight mean of every update since it started; start it late
  (after the loss plateaus), e.g. with `start_step`.
- lawa: the mean of the last `window` snapshots taken every `every` steps;
  the cheapest way to get the checkpoint-averaging gain of a constant-LR run.
"""

from __future__ import annotations

from pathlib import Path

try:  # transformers is an optional dependency
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]

from mergelab.checkpoint.state_file import load_state, save_state
from mergelab.checkpoint.tensor_file import save_tensors
from mergelab.errors import InvalidInput
from mergelab.trajectory.averager import WeightAverager


class AveragingCallback(TrainerCallback):
    """Keep an EMA / SWA / LAWA average of the model during `Trainer.train()`."""

    def __init__(self, scheme: str = "ema", *, decay: float = 0.999, warmup: bool = False, window: int = 5,
                 every: int = 1, start_step: int = 0, copy_to_model: bool = False):
        if every < 1:
            raise InvalidInput(f"every must be at least 1, got {every}")
        if scheme not in ("ema", "swa", "lawa"):
            raise InvalidInput(f"unknown scheme {scheme!r}; choose ema, swa or lawa")
        self.kwargs = dict(scheme=scheme, decay=decay, warmup=warmup, window=window)
        self.every, self.start_step, self.copy_to_model = every, start_step, copy_to_model
        self.averager: WeightAverager | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.averager is None:
            self.averager = WeightAverager(model, **self.kwargs)
            resume = getattr(args, "resume_from_checkpoint", None)
            saved = Path(resume) / "averaged" / "averager.pt" if resume else None
            if saved is not None and saved.is_file():
                self.averager.load_state_dict(load_state(saved, map_location=None))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step >= self.start_step and (step - self.start_step) % self.every == 0:
            self.averager.update(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.averager is None or self.averager.num_updates == 0:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / "averaged"
        folder.mkdir(parents=True, exist_ok=True)
        self._save_average(model, folder)
        save_state(self.averager.state_dict(), folder / "averager.pt")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.copy_to_model and self.averager is not None and self.averager.num_updates:
            self.averager.copy_to(model)

    def _save_average(self, model, folder: Path) -> None:
        averaged = dict(zip(self.averager.names, self.averager.averaged()))
        state = {}
        seen: dict[int, str] = {}
        for name, t in model.state_dict().items():
            value = averaged.get(name, t)
            ptr = t.data_ptr()
            if ptr in seen and name not in averaged:  # tied weights are stored once, as transformers does
                continue
            seen[ptr] = name
            state[name] = value.detach().to("cpu", t.dtype).contiguous()
        save_tensors(folder / "model.safetensors", state, metadata={"format": "pt"})
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(folder)
