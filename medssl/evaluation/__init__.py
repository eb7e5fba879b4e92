"""Evaluation of pretrained backbones: protocols (linear probe, fine-tuning, weighted kNN), metrics with
stratified bootstrap CIs, paired comparisons, reports and plots.

Entry points: ``medssl.evaluation.run.run_evaluation`` (``medssl evaluate``) and
``medssl.evaluation.report.compare_evaluations`` (``medssl report``).
"""
