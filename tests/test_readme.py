"""The README's "Using jmoe.MoE in your own model" snippets run as written (8 emulated devices)."""

import pathlib
import re


def test_readme_snippets_run():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Using `jmoe.MoE` in your own model", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) >= 4
    namespace: dict = {}
    for snippet in snippets:  # one namespace: later snippets use the first one's Block
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (4, 32, 64)
    assert set(namespace["losses"]) >= {"load_balancing_loss", "z_loss"}
    assert namespace["h"].shape == (4, 32, 64) and namespace["lb"].shape == (4,)
