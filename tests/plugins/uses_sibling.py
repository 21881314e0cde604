"""A plugin file that imports a module beside it."""

from sibling_helper import per_row_ce

import ce_audit

ce_audit.register("sibling_ce")(per_row_ce)
