"""The fusion models (one registry), the cross-validated trainer, reports, ablation and `mer predict`."""
