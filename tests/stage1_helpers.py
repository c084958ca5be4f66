"""Command lines for stage-1 and stage-2 runs on the small demo dataset."""

from __future__ import annotations

from pathlib import Path


def stage1_argv(demo: dict[str, Path], clip: Path, output_dir: Path, *extra: str) -> list[str]:
    """The original README's stage-1 flags (docs/method.md §8), pointed at the small demo data and tiny CLIP."""
    return [
        "--do_train", "--num_thread_reader=0", "--epochs=2", "--batch_size=8", "--n_display=1",
        f"--train_csv={demo['train_csv']}", f"--val_csv={demo['test_csv']}", f"--data_path={demo['data_json']}",
        f"--features_path={demo['videos_dir']}", f"--output_dir={output_dir}", "--lr=1e-3", "--max_words=16",
        "--max_frames=3", "--batch_size_val=4", "--datatype=msrvtt",
        "--feature_framerate=1", "--coef_lr=1", "--freeze_layer_num=0", "--slice_framepos=2", "--loose_type",
        "--linear_patch=2d", "--sim_header=meanP", "--pretrained_clip_name=ViT-B/16",
        f"--visual_pretrain_path={clip}", f"--cross_config_path={Path(__file__).resolve().parents[1] / 'CLIP-modules'}",
        "--no-tensorboard", *extra,
    ]


def stage2_argv(demo: dict[str, Path], clip: Path, init_model: Path, output_dir: Path, *extra: str) -> list[str]:
    """The original README's stage-2 flags (docs/method.md §8), pointed at the small demo data and tiny CLIP."""
    return [
        "--do_train", "--num_thread_reader=0", "--epochs=2", "--batch_size=8", "--n_display=1",
        f"--train_csv={demo['train_csv']}", f"--val_csv={demo['test_csv']}", f"--data_path={demo['data_json']}",
        f"--features_path={demo['videos_dir']}", "--warmup_proportion=0.2", f"--output_dir={output_dir}",
        "--lr=1e-3", "--new_params_lr=1e-3", "--max_words=16", "--max_frames=3", "--batch_size_val=4",
        "--datatype=msrvtt", "--feature_framerate=2", "--coef_lr=1e-3",
        "--freeze_layer_num=0", "--slice_framepos=2", "--loose_type", "--linear_patch=2d", "--sim_header=meanP",
        f"--init_model={init_model}", f"--visual_pretrain_path={clip}", "--fusion_layers=2", "--rerank_top_k=3",
        f"--cross_config_path={Path(__file__).resolve().parents[1] / 'CLIP-modules'}", "--no-tensorboard", *extra,
    ]
