"""The page shell of the HTML reports: inline CSS, the colour-switcher script, header, navigation and sections."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from opd_callback.report.html.format import ALIGNMENT_COLOR_JS, esc

__all__ = ["page", "section", "write_page"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24323f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header .meta{font-size:12px;color:#cfd8e0;margin-top:4px}
nav{background:#fff;border-bottom:1px solid #ddd;padding:6px 24px;font-size:13px;position:sticky;top:0;z-index:5}
nav a{margin-right:12px;color:#246;text-decoration:none}
main{padding:8px 24px 40px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;margin:14px 0;padding:10px 16px;overflow-x:auto}
section h2{font-size:16px;margin:4px 0 8px}
p.help{font-size:12px;color:#555;margin:4px 0 8px;max-width:980px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f3f6;white-space:normal;vertical-align:bottom}td:first-child,th:first-child{text-align:left}
td.pos{color:#1a7f37}td.neg{color:#b42318}tr.best td{font-weight:bold}
.plots{display:flex;flex-wrap:wrap;gap:10px}svg.plot{background:#fff;border:1px solid #eee}
.warn{background:#fff4e5;border:1px solid #f0b86e;padding:8px 12px;border-radius:4px;margin:10px 0}
.q{border-top:1px solid #ddd;padding:8px 0}.q h3{font-size:14px;margin:4px 0}
.prompt{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f6f8fa;
 border-left:3px solid #bbb;padding:4px 8px;max-height:160px;overflow:auto}
.rollout{margin:6px 0}.rollout .hdr{font-size:12px;color:#555}
.toks{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;
 word-break:break-all}
.tok{position:relative}.tok.node{border-bottom:2px solid #444;cursor:help;border-radius:2px}
.tok.node:focus{outline:2px solid #246}
.tok .tip{display:none;position:absolute;left:0;top:1.6em;z-index:10;background:#fff;color:#222;border:1px solid #888;
 box-shadow:0 2px 8px rgba(0,0,0,.2);padding:6px 8px;white-space:normal;width:max-content;max-width:520px;
 font-size:11px;line-height:1.4;font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif}
.tok:hover>.tip,.tok:focus>.tip{display:block}.tip table{margin:2px 0}.tip td,.tip th{padding:1px 5px}
.legend{font-size:12px}.legend span{padding:0 6px;margin-right:4px}
.chips .tok{margin-right:6px}
"""

# re-colours the tokens (numbers read from their data-a attributes) when another configuration is picked
_JS = """
(function(){""" + ALIGNMENT_COLOR_JS + """
  var sel=document.getElementById('colorcfg'); if(!sel) return;
  sel.addEventListener('change',function(){
    var i=parseInt(sel.value,10);
    var els=document.querySelectorAll('.tok.node');
    for(var k=0;k<els.length;k++){var v=(els[k].getAttribute('data-a')||'').split(',')[i];
      els[k].style.background=col(v);}
  });
})();
"""


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str, script: bool = True) -> str:
    """The whole page: ``title`` (escaped), ``subtitle`` and ``body`` (HTML the caller escaped), a navigation bar of
    ``(section id, label)`` links, and the colour-switcher script when ``script``."""
    links = "".join(f'<a href="#{esc(i)}">{esc(t)}</a>' for i, t in nav)
    js = f"<script>{_JS}</script>" if script else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><div class=\"meta\">{subtitle}</div></header>"
        f"<nav>{links}</nav><main>{body}</main>{js}</body></html>\n"
    )


def section(sid: str, title: str, help_text: str, content: str) -> str:
    """A report section: id, heading and help text (escaped), then ``content`` (HTML the caller escaped)."""
    return (f'<section id="{esc(sid)}"><h2>{esc(title)}</h2><p class="help">{esc(help_text)}</p>'
            f"{content}</section>")


def write_page(html_page: str, path: str | Path | None) -> str:
    """Write ``html_page`` to ``path`` (parent directories created) when a path is given; return the page."""
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(html_page, encoding="utf-8")
    return html_page
