"""The hospital agent: bundle runtime, local SHAP explanations, edge fine-tuning, install and checks."""
