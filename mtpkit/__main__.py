from mtpkit.cli import app

app()
