"""The ``vlm`` command.

- ``vlm fit|validate|test|predict --config FILE [--key value ...]``: LightningCLI over the tasks in ``vlm.tasks``
  (:mod:`vlm.fit`).
- ``vlm data shapes|shapes-vqa|scenes|digits|shards ...``: writes the built-in datasets (see ``vlm data --help``).
- ``vlm export --checkpoint CKPT --out DIR``: model weights as safetensors plus the constructor config.
- ``vlm explain --checkpoint CKPT IMAGE... [--labels A,B] --out DIR``: attention and similarity maps (PNG + JSON).
- ``vlm serve --clip CKPT [--captioner CKPT] [--index INDEX]``: a web page over the models (127.0.0.1 by default).
- ``vlm index --checkpoint CKPT --images DIR --out INDEX``, ``vlm search --index INDEX QUERY``, ``vlm retrieval
  --checkpoint CKPT --images DIR [--compositional]``: image search over a folder (see ``vlm.index``), retrieval
  recall and a compositional test (see ``vlm.retrieval``).
- ``vlm eval --checkpoint CKPT --task caption|vqa|classify --data DIR --shots 0,4,8 --select random|rices``: few-shot
  evaluation of a Flamingo, as OpenFlamingo's eval suite (see ``vlm.fewshot``).

Each command lives in its own module (:mod:`vlm.fit`, :mod:`vlm.cli`, :mod:`vlm.serve`, :mod:`vlm.data.commands`);
this one only dispatches, imports nothing else until a command is chosen, and prints the list of commands.
"""

from __future__ import annotations

import sys

# Every command, with what it does, for ``vlm --help`` and for the message on an unknown command.
COMMANDS = {
    "fit": "train a task from a config (LightningCLI; vlm fit --help for its options)",
    "validate": "run a task's validation from a config",
    "test": "run a task's test loop from a config",
    "predict": "run a task's prediction loop from a config",
    "export": "write a checkpoint as model.safetensors + config.json",
    "data": "write the built-in datasets (shapes, shapes-vqa, scenes, digits, shards)",
    "explain": "attention and similarity maps of images, as PNG overlays + JSON",
    "index": "embed a folder of images for search (incremental)",
    "search": "search an index with a text query",
    "retrieval": "image-text retrieval recall of a checkpoint on a captioned folder (and a compositional test)",
    "serve": "a local web page over a CLIP (and a captioner, an index)",
    "eval": "few-shot caption, VQA or classification scores of a Flamingo (random or RICES examples)",
}


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlm COMMAND [options]   (vlm COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        from vlm.inputs import printable

        print(f"vlm: error: unknown command {printable(argv[0])!r}; the commands are {', '.join(COMMANDS)} "
              "(vlm --help)", file=sys.stderr)
        return 2
    if argv and argv[0] == "data":
        from vlm.data.commands import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "export":
        from vlm.cli import export_main

        return export_main(argv[1:])
    if argv and argv[0] == "serve":
        from vlm.serve import serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "explain":
        from vlm.cli import explain_main

        return explain_main(argv[1:])
    if argv and argv[0] == "eval":
        from vlm.cli import eval_main

        return eval_main(argv[1:])
    if argv and argv[0] in ("index", "search", "retrieval"):
        from vlm.cli import index_main, retrieval_main, search_main

        return {"index": index_main, "search": search_main, "retrieval": retrieval_main}[argv[0]](argv[1:])
    from vlm.fit import fit_main

    return fit_main(None if from_command_line else argv)


if __name__ == "__main__":
    sys.exit(main())
