"""The dashboard's HTML, as Jinja2 templates (autoescaped); the stylesheet is written beside the pages."""

from __future__ import annotations

from jinja2 import DictLoader, Environment, select_autoescape

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1b1b1b}
nav{background:#263238;color:#eceff1;padding:8px 16px}nav a{color:#fff;font-weight:600;text-decoration:none}
main{padding:8px 24px 24px;max-width:1400px}h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #cfd8dc;padding:3px 8px;text-align:left}
th{background:#eceff1}.chart{margin:12px 0;min-height:260px}.empty{color:#777;font-style:italic}
.s-ok,.v-no-change,.v-improvement{color:#2e7d32}.s-failed,.s-timeout,.s-interrupted,.v-regression{color:#c62828;font-weight:600}
.v-too-little-history,.v-not-judged{color:#777}.v-machine-change,.v-straggler{color:#e65100}code{background:#f5f5f5;padding:0 3px}
footer{color:#777;padding:12px 24px;font-size:12px}
"""

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<link rel="stylesheet" href="{{ root }}assets/style.css">
{% if items %}<script src="{{ root }}assets/bokeh.min.js"></script>{% endif %}
</head><body>
<nav><a href="{{ root }}index.html">ISP Bench</a> {% for text, href in crumbs %} / <a href="{{ href }}">{{ text }}</a>{% endfor %}</nav>
<main>{% block body %}{% endblock %}</main>
<footer>Generated {{ generated }} from {{ db }} by run_bench.py dashboard.</footer>
{% if items %}<script type="application/json" id="chart-items">{{ items|safe }}</script>
<script>
// Each chart is drawn after the previous one reached the screen, so the first shows early;
// window.__charts keeps when each was drawn (bench/dashboard/measure.py reads it).
window.__charts = [];
(async () => {
  const items = JSON.parse(document.getElementById("chart-items").textContent);
  for (const [id, item] of items) {
    await Bokeh.embed.embed_item(item, id);
    await new Promise(done => requestAnimationFrame(() => { window.__charts.push(performance.now()); done(); }));
  }
})();
</script>{% endif %}
</body></html>
"""

MACROS = """
{% macro status(s) %}<span class="s-{{ s|replace(' ', '-') }}">{{ s }}</span>{% endmacro %}
{% macro verdict(v) %}<span class="v-{{ v|replace(' ', '-') }}">{{ v }}</span>{% endmacro %}
"""

INDEX = """{% extends "base" %}{% import "macros" as m %}{% block body %}
<h1>ISP Bench: {{ configs|length }} configuration(s), {{ nruns }} recorded run(s)</h1>
{% for c in configs %}
<h2 id="{{ c.slug }}">{{ c.name }}</h2>
<p>{{ c.runs|length }} run(s), newest <a href="{{ c.newest.href }}">{{ c.newest.name }}</a> ({{ c.newest.utc }}).</p>
<h3>Open regressions</h3>
{% if c.open %}<table><tr><th>cell</th><th>metric</th><th>since run</th><th>change</th></tr>
{% for o in c.open %}<tr><td><a href="{{ o.href }}">{{ o.cell }}</a></td><td>{{ o.metric }}</td><td>{{ o.since }}</td><td>{{ o.text }}</td></tr>{% endfor %}
</table>{% else %}<p class="empty">none open{% if not c.judged %} (no run of this configuration was judged by run_bench.py nightly){% endif %}</p>{% endif %}
<h3>Cells</h3>
<table><tr><th>cell</th><th>latest status</th><th>latest verdict</th><th>step time</th><th>tokens/s</th><th>runs</th></tr>
{% for cell in c.cells %}<tr><td><a href="{{ cell.href }}">{{ cell.cell }}</a></td><td>{{ m.status(cell.status) }}</td>
<td>{{ m.verdict(cell.verdict) }}</td><td>{{ cell.step }}</td><td>{{ cell.tokens }}</td><td>{{ cell.nruns }}</td></tr>{% endfor %}
</table>
<h3>Runs</h3>
<table><tr><th>run</th><th>started (UTC)</th><th>commit</th><th>nightly</th></tr>
{% for r in c.runs %}<tr><td><a href="{{ r.href }}">{{ r.name }}</a></td><td>{{ r.utc }}</td><td><code>{{ r.commit }}</code></td><td>{{ m.verdict(r.verdict) }}</td></tr>{% endfor %}
</table>
{% endfor %}{% endblock %}"""

CELL = """{% extends "base" %}{% import "macros" as m %}{% block body %}
<h1>{{ cell.config }} / {{ cell.cell }}</h1>
<p>Latest status {{ m.status(cell.status) }}, latest verdict {{ m.verdict(cell.verdict) }}.
Hover a point for its run, commit, date and value; click it for the run's page. Dashed lines mark
change points (red: regression, green: improvement), dotted ones acknowledged changes.</p>
{% if items %}<div class="chart" id="charts"></div>{% endif %}
{% if empty %}<p class="empty">No recorded values for: {{ empty|join(", ") }} (MFU and energy per token are null on CPU, without NVML).</p>{% endif %}
<h2>Change points</h2>
{% if changes %}<table><tr><th>metric</th><th>run</th><th>what</th></tr>
{% for metric, mark in changes %}<tr><td>{{ metric }}</td><td>{{ mark.run }}</td><td>{{ mark.text }}</td></tr>{% endfor %}
</table>{% else %}<p class="empty">none found</p>{% endif %}
{% endblock %}"""

RUN = """{% extends "base" %}{% import "macros" as m %}{% block body %}
<h1>{{ run.name }}</h1>
<p>Configuration <a href="{{ root }}index.html#{{ slug }}">{{ run.config_name }}</a>, started {{ run.utc }},
commit <code>{{ run.git_commit }}</code> on {{ run.hostname }}{% if run.gpu %} ({{ run.gpu }}){% endif %}. Folder: <code>{{ run.path }}</code>.</p>
<h2>Nightly verdict</h2>
{% if nightly %}<p>exit code {{ nightly.exit_code }}: {{ nightly.meaning }}; {{ nightly.regressions }} regression(s),
{{ nightly.improvements }} improvement(s).</p>
{% if nightly.rows %}<table><tr><th>cell</th><th>metric</th><th>status</th><th>note</th></tr>
{% for r in nightly.rows %}<tr><td>{{ r.cell }}</td><td>{{ r.metric }}</td><td>{{ m.verdict(r.status) }}</td><td>{{ r.note }}</td></tr>{% endfor %}
</table>{% endif %}{% else %}<p class="empty">not judged (run_bench.py nightly --run RUN_DIR writes nightly.json)</p>{% endif %}
<h2>Summary</h2>
{% if summary %}{{ summary|safe }}{% else %}<p class="empty">{{ missing }}</p>{% endif %}
<h2>Changed since the previous run{% if prev %} (<a href="{{ prev.href }}">{{ prev.name }}</a>){% endif %}</h2>
{% if not prev %}<p class="empty">the first recorded run of this configuration</p>
{% elif not compared %}<p class="empty">this run's or the previous run's folder is not readable: nothing to compare</p>{% else %}
{% if env %}<table><tr><th>env</th><th>before</th><th>now</th></tr>{% for k, a, b in env %}<tr><td>{{ k }}</td><td>{{ a }}</td><td>{{ b }}</td></tr>{% endfor %}</table>
{% else %}<p>environment: unchanged</p>{% endif %}
{% if config %}<table><tr><th>config key</th><th>before</th><th>now</th><th>cells</th></tr>{% for k, a, b, cells in config %}<tr><td>{{ k }}</td><td>{{ a }}</td><td>{{ b }}</td><td>{{ cells|join(", ") }}</td></tr>{% endfor %}</table>
{% else %}<p>configuration: unchanged</p>{% endif %}
{% if moved %}<table><tr><th>cell</th><th>metric</th><th>before</th><th>now</th><th>verdict</th></tr>{% for r in moved %}<tr><td>{{ r[0] }}</td><td>{{ r[1] }}</td><td>{{ r[2] }}</td><td>{{ r[3] }}</td><td>{{ m.verdict(r[4]) }}</td></tr>{% endfor %}</table>{% endif %}
{% endif %}
<h2>Traces</h2>
{% if traces %}<p>torch.profiler Chrome traces, one per rank. Open <a href="https://ui.perfetto.dev">ui.perfetto.dev</a>
and drag a file onto it (or "Open trace file"): Perfetto reads it inside the browser and uploads nothing.
chrome://tracing opens them too. Browsers do not let a web page open file:// links, so save or drag the file.</p>
<ul>{% for cell, links in traces %}<li>{{ cell }}: {% for name, href in links %}<a href="{{ href }}">{{ name }}</a> {% endfor %}</li>{% endfor %}</ul>
{% else %}<p class="empty">no traces recorded (profile.enabled: false, or the folder is gone)</p>{% endif %}
{% endblock %}"""

ENV = Environment(loader=DictLoader({"base": BASE, "macros": MACROS, "index": INDEX, "cell": CELL, "run": RUN}),
                  autoescape=select_autoescape(default=True, default_for_string=True))


def render(name: str, **context: object) -> str:
    return ENV.get_template(name).render(**context)
