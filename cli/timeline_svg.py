"""Drawing ``replay reach`` timelines as SVG (or an HTML page around the SVG).

One row per pair; a bar for each interval during which the source could reach the
destination (hover: the rule, the opening and the closing event); a tick under the row
for every event that touched the pair, labelled with its actor. The time axis is
linear between the first and the last instant shown. Text is escaped; the output has
no scripts and no external references.
"""

from __future__ import annotations

from datetime import datetime
from html import escape

from projections.replay import Timeline, parse_time

__all__ = ["render_html", "render_svg"]

_W, _LEFT, _ROW, _TOP = 960, 180, 70, 30


def _t(ref: object) -> datetime | None:
    if isinstance(ref, dict) and isinstance(ref.get("time"), str):
        return parse_time(str(ref["time"]))
    return None


def render_svg(timelines: list[Timeline]) -> str:
    instants = [t.end.now for t in timelines] + [t.start.now for t in timelines if t.start.seq > 0]
    for tl in timelines:
        instants.extend(when for e in tl.events if (when := _t(e)) is not None)
    lo, hi = min(instants), max(instants)
    span = max((hi - lo).total_seconds(), 1.0)

    def x(t: datetime | None) -> float:
        t = t or hi
        return _LEFT + (_W - _LEFT - 20) * max(0.0, (t - lo).total_seconds()) / span

    height = _TOP + _ROW * len(timelines) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{_LEFT}" y="16">{escape(lo.isoformat())} … {escape(hi.isoformat())}</text>',
    ]
    for i, tl in enumerate(timelines):
        y = _TOP + i * _ROW
        label = f"{tl.src} → {tl.dst}" + (f":{tl.port}" if tl.port is not None else "")
        out.append(f'<text x="4" y="{y + 18}">{escape(label)}</text>')
        out.append(f'<line x1="{_LEFT}" y1="{y + 14}" x2="{_W - 20}" y2="{y + 14}" stroke="#ccc"/>')
        for interval in tl.intervals:
            x0, x1 = x(_t(interval.opened)), x(_t(interval.closed) if interval.closed else tl.end.now)
            title = f"{interval.rule}\nopened: #{interval.opened.get('seq')} by {interval.opened.get('actor')}"
            if interval.closed:
                title += f"\nclosed: #{interval.closed.get('seq')} by {interval.closed.get('actor')}"
            out.append(
                f'<rect class="interval" x="{x0:.1f}" y="{y + 6}" width="{max(x1 - x0, 2):.1f}" height="16" '
                f'fill="#3a7" opacity="0.8"><title>{escape(title)}</title></rect>'
            )
        for event in tl.events:
            ex = x(_t(event))
            tip = "#{} {} by {}".format(event.get("seq"), event.get("type"), event.get("actor"))
            out.append(
                f'<line class="tick" x1="{ex:.1f}" y1="{y + 24}" x2="{ex:.1f}" y2="{y + 32}" stroke="#333">'
                f"<title>{escape(tip)}</title></line>"
            )
            out.append(
                f'<text x="{ex:.1f}" y="{y + 44}" font-size="9" text-anchor="middle">'
                f"{escape(str(event.get('actor')))}</text>"
            )
    out.append("</svg>\n")
    return "\n".join(out)


def render_html(timelines: list[Timeline], svg: str) -> str:
    rows = "".join(
        f"<tr><td>{escape(tl.src)} → {escape(tl.dst)}</td><td>{escape(i.rule)}</td>"
        f"<td>#{escape(str(i.opened.get('seq')))} {escape(str(i.opened.get('actor')))}</td>"
        f"<td>{escape('#' + str(i.closed.get('seq')) + ' ' + str(i.closed.get('actor')) if i.closed else 'open')}</td></tr>"
        for tl in timelines
        for i in tl.intervals
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>tailledger reach</title></head><body>"
        f"{svg}<table border='1' cellpadding='4'><tr><th>Pair</th><th>Rule</th><th>Opened by</th>"
        f"<th>Closed by</th></tr>{rows}</table></body></html>\n"
    )
