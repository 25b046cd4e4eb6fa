#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        # Load the settings here, so a bad environment variable stops with its message and no traceback.
        settings.INSTALLED_APPS
    except ImproperlyConfigured as error:
        sys.exit(f"configuration error: {error}")
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
