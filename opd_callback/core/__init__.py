"""The method: divergences and their directions (``divergences``), the ideal gradient and alignment at a node
(``alignment``), node selection (``nodes``), sample allocation (``allocation``), parameter-space alignment
(``param_space``), the settings (``settings``), checks of user inputs (``inputs``), one prompt's run (``prompt_run``),
and the engine that runs targeted rollouts through a rollout backend (``engine``).

Imports neither TRL nor wandb.
"""
