from .scheduling_onestep import OneStepScheduler, OneStepSchedulerOutput


__all__ = ["OneStepScheduler", "OneStepSchedulerOutput"]
