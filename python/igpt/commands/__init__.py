"""The ``igpt`` sub-commands: argument parsing and printing, nothing else.

Each module here (``pretrain``, ``probe``, ``finetune``, ``sample``, ``fit_palette``,
``demo``, ``info``, ``bench``) defines ``add_arguments(parser)`` and ``run(args)`` and calls
the library (``igpt.train``, ``igpt.probe``, ...), which neither prints nor exits.
``_common`` holds what several commands share: flags generated from config dataclasses, the
device choice, the checkpoint preamble and labelled splits. ``igpt.cli.COMMANDS`` maps each
command's name to its module.
"""
