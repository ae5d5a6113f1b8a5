from regstream.cli.main import app

app(prog_name="regstream")
