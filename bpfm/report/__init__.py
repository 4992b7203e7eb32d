"""The clinical-standard leaderboard: MLflow runs -> the paper's tables (II-V), the calibration
gap, subgroups with bootstrap CIs, Bland-Altman / scatter / error plots, as md, html and CSV."""
