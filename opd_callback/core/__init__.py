"""The method: divergences and their directions, the ideal gradient and alignment at a node, node selection, sample
allocation, the settings, and the engine that runs targeted rollouts through a rollout backend.

Imports neither TRL nor wandb.
"""
