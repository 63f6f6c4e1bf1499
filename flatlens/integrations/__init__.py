"""Thin adapters for the frameworks people already train with.

* :mod:`flatlens.integrations.lightning`:
  :class:`~flatlens.integrations.lightning.SharpnessAwareMixin`
  for a ``LightningModule`` whose ``configure_optimizers`` returns :class:`~flatlens.optim.SAM`
  or :class:`~flatlens.optim.GAM` (gradient accumulation made exact, GAM's exact mode);
* :mod:`flatlens.integrations.transformers`:
  :class:`~flatlens.integrations.transformers.SharpnessAwareTrainerMixin` and
  ``SharpnessAwareTrainer``, a Hugging Face ``Trainer`` that runs the SAM/GAM passes in
  ``training_step`` with the Trainer's own accelerator, mixed precision and gradient
  accumulation.

Each module imports its framework lazily, through :mod:`flatlens._compat`, so importing
flatlens never needs Lightning or transformers. They drive the optimizers of
:mod:`flatlens.optim`; nothing here is a second implementation of SAM or GAM.
"""

__all__: list[str] = []
