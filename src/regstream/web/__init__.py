"""The operator's web pages: Jinja2 shells in ``templates/``, ES modules and CSS in ``static/``."""
