"""The README's model table, from the registry: `python -m tools.model_table [--write]`."""

import nets


def model_table() -> str:
    """Parameters with the default head (1000 classes; a COCO detector's 90): the registry's
    reference figure where there is one (each family's tests assert that our count equals it,
    so the table need not count again), else counted with jax.eval_shape."""
    rows = ["| model | params | reference (params equal ours) | train / test px |",
            "|---|---:|---|---|"]
    counted = {}  # one count per network (nets.registry.network_key)
    for name in nets.list_models():
        info = nets.model_info(name)
        ours = info.reference_params
        if ours is None:
            key = nets.registry.network_key(name)
            if key not in counted:
                counted[key] = nets.introspect.count_params(name)
            ours = counted[key]
        rows.append(f"| {name} | {ours:,} | {info.reference} | "
                    f"{info.train_size} / {info.test_size} |")
    return "\n".join(rows)




def update_readme(path="README.md") -> None:
    """Rewrites the table between the README's model-table markers."""
    begin, end = "<!-- model-table:begin -->", "<!-- model-table:end -->"
    table = model_table()  # before opening for writing: a failing registry leaves the file
    with open(path) as f:
        head, rest = f.read().split(begin)
    _, tail = rest.split(end)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    update_readme() if "--write" in sys.argv else print(model_table())
