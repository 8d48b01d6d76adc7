"""Learner side: step functions of (drafter, experience) -> loss, shared by the single-process
trainer and the DeepSpeed learner group."""
