"""One configuration, without Ray: the recipe (`config`), the loop (`loop.fit`), its exact-resume
checkpoints (`state`), inference (`predict`), metrics on a view (`evaluate`), the model dir
(`model_dir`), per-subject calibration (`calibration`) and SimMIM pretraining (`pretrain`)."""
