"""``nitrovault local ...``: composition root for the local stand-ins.

Each verb's implementation lives in the module that owns it; this file only registers them.
"""

import typer

from nitrovault.cli import local_attest, local_kms, local_up

app = typer.Typer(no_args_is_help=True)
app.command("attest")(local_attest.attest)
app.command("kms")(local_kms.kms)
app.command("up")(local_up.up)
