"""The web console: its pages (one module each, sharing console/base.py), gathered into one
Klein app. See console/base.py for what every response and POST is held to."""

from __future__ import annotations

from hl7relay.console.accounts import AccountPages
from hl7relay.console.base import CSP, ConsoleBase
from hl7relay.console.channels import ChannelPages
from hl7relay.console.configuration import ConfigurationPages
from hl7relay.console.dashboard import DashboardPages
from hl7relay.console.files import FilePages
from hl7relay.console.integrations import IntegrationPages
from hl7relay.console.messages import MessagePages
from hl7relay.console.signin import SignInPages
from hl7relay.console.troubleshooting import TroubleshootingPages


__all__ = ["Console", "CSP"]


class Console(SignInPages, DashboardPages, MessagePages, AccountPages, ChannelPages, TroubleshootingPages,
              IntegrationPages, FilePages, ConfigurationPages, ConsoleBase):
    """The console: every page's routes on one app (``resource()`` serves them)."""
