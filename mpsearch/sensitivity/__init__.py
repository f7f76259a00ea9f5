"""Sensitivity: how much quantizing each layer hurts — Hessian traces, perturbation, Fisher."""
