"""The README's two commands are what CI runs, verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == blocks
    assert "torch==2.13.0" in blocks[0] and blocks[0].index("torch==2.13.0") < blocks[0].index("-e")


def test_shipped_recipes_are_valid():
    """configs/*.toml pass the same up-front validation `cosmos3 train` runs (keys, types, values)."""
    import glob
    import tomllib

    from cosmos3.training.recipes import read_distill_recipe, read_train_recipe

    recipes = sorted(glob.glob(str(ROOT / "configs" / "*.toml")))
    assert len(recipes) >= 2
    for path in recipes:
        with open(path, "rb") as f:
            distill = "distill" in tomllib.load(f)
        (read_distill_recipe if distill else read_train_recipe)(path)
