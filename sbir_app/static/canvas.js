(() => {
  if (window.sbirSketch) return;
  const S = {strokes: [], cur: null, size: 6, w: 0, h: 0, canvas: null, pid: null};
  window.sbirSketch = S;
  const find = () => document.querySelector('#sketch canvas');
  function sync() {
    const c = find();
    if (!c) return null;
    const dpr = window.devicePixelRatio || 1, w = c.clientWidth, h = c.clientHeight;
    if (c !== S.canvas || S.w !== w || S.h !== h || c.width !== Math.round(w * dpr)) {
      S.canvas = c; S.w = w; S.h = h;
      c.width = Math.max(1, Math.round(w * dpr)); c.height = Math.max(1, Math.round(h * dpr));
      redraw();
    }
    return c;
  }
  function ctx() {
    const c = S.canvas, g = c.getContext('2d'), k = c.width / Math.max(1, S.w);
    g.setTransform(k, 0, 0, k, 0, 0);
    g.lineCap = 'round'; g.lineJoin = 'round';
    return g;
  }
  function dot(g, p, size) { g.beginPath(); g.arc(p[0], p[1], size / 2, 0, 2 * Math.PI); g.fill(); }
  function drawStroke(g, st) {
    const p = st.points;
    g.strokeStyle = '#000'; g.fillStyle = '#000'; g.lineWidth = st.size;
    if (p.length === 1) return dot(g, p[0], st.size);
    g.beginPath(); g.moveTo(p[0][0], p[0][1]);
    for (let i = 1; i < p.length; i++) g.lineTo(p[i][0], p[i][1]);
    g.stroke();
  }
  function redraw() {
    if (!S.canvas) return;
    const g = ctx();
    g.fillStyle = '#fff'; g.fillRect(0, 0, S.w, S.h);
    for (const st of S.strokes) drawStroke(g, st);
    if (S.cur) drawStroke(g, S.cur);
  }
  function box() { return document.querySelector('#strokes textarea, #strokes input'); }
  // Stroke JSON -> #strokes, then its input event: a search. Every search from the canvas
  // (a stroke, Undo, Clear, an example) goes this one way, so their answers arrive in order.
  S.search = (value) => {
    const t = box();
    if (!t) return;
    t.value = value;
    t.dispatchEvent(new Event('input', {bubbles: true}));  // updates the textbox' value
    // Gradio 6's textbox fires its `input` event from keypress (after the value settles)
    t.dispatchEvent(new KeyboardEvent('keypress', {bubbles: true, key: 'Unidentified'}));
  };
  function send() {  // the full stroke list
    // The brush the person chose travels with the strokes: the server draws the lines
    // that wide (scaled like the drawing, within the widths the model was trained on).
    const brush = S.strokes.length ? S.strokes.reduce((a, s) => a + s.size, 0) / S.strokes.length : S.size;
    S.search(JSON.stringify({strokes: S.strokes.map(s => s.points), brush: Math.round(brush * 10) / 10}));
  }
  function pt(e) {
    const r = S.canvas.getBoundingClientRect();
    const x = Math.min(Math.max(e.clientX - r.left, 0), r.width), y = Math.min(Math.max(e.clientY - r.top, 0), r.height);
    return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
  }
  document.addEventListener('pointerdown', e => {
    if (e.button !== 0 || !(e.target instanceof HTMLCanvasElement) || !e.target.closest('#sketch')) return;
    sync();
    e.preventDefault();
    try { e.target.setPointerCapture(e.pointerId); } catch (_) {}
    S.pid = e.pointerId;
    S.cur = {points: [pt(e)], size: S.size};
    const g = ctx(); g.fillStyle = '#000'; dot(g, S.cur.points[0], S.size);
  });
  document.addEventListener('pointermove', e => {
    if (!S.cur || e.pointerId !== S.pid) return;
    const evs = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    const g = ctx(); g.strokeStyle = '#000'; g.lineWidth = S.cur.size;
    for (const ev of (evs.length ? evs : [e])) {
      const p = pt(ev), q = S.cur.points[S.cur.points.length - 1];
      if (Math.abs(p[0] - q[0]) + Math.abs(p[1] - q[1]) < 1) continue;
      S.cur.points.push(p);
      g.beginPath(); g.moveTo(q[0], q[1]); g.lineTo(p[0], p[1]); g.stroke();
    }
  });
  function end(e) {
    if (!S.cur || e.pointerId !== S.pid) return;
    S.strokes.push(S.cur); S.cur = null; S.pid = null;
    send();
  }
  document.addEventListener('pointerup', end);
  document.addEventListener('pointercancel', end);
  S.clear = () => {
    S.strokes = []; S.cur = null; sync(); redraw();
    // The empty drawing goes the way every stroke goes, so its answer (no results, the
    // plain map) cannot be overtaken by a search still running for an earlier stroke.
    send();
    const b = document.querySelector('#clear-trigger');  // and the explanation panels empty
    if (b) b.click();
  };
  S.undo = () => { S.strokes.pop(); sync(); redraw(); if (S.strokes.length) send(); else S.clear(); };
  // An example (or any stroke JSON from the server): fit it into the canvas and draw it.
  S.load = (value) => {
    let d = value;
    try { if (typeof d === 'string') d = d.trim() ? JSON.parse(d) : []; } catch (_) { return; }
    let strokes = Array.isArray(d) ? d : ((d && d.strokes) || []);
    strokes = strokes.filter(s => Array.isArray(s) && s.length).map(s =>
      (s.length === 2 && Array.isArray(s[0]) && s[0].length !== 2) ? s[0].map((x, i) => [x, s[1][i]]) : s);
    sync();
    const all = strokes.flat();
    S.strokes = [];
    if (all.length && S.w > 0) {
      const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
      const x0 = Math.min(...xs), y0 = Math.min(...ys), x1 = Math.max(...xs), y1 = Math.max(...ys);
      const m = 0.12, k = Math.min(S.w * (1 - 2 * m) / Math.max(1, x1 - x0), S.h * (1 - 2 * m) / Math.max(1, y1 - y0));
      const ox = (S.w - (x1 - x0) * k) / 2 - x0 * k, oy = (S.h - (y1 - y0) * k) / 2 - y0 * k;
      S.strokes = strokes.map(s => ({size: S.size, points: s.map(p =>
        [Math.round((p[0] * k + ox) * 10) / 10, Math.round((p[1] * k + oy) * 10) / 10])}));
    }
    redraw();
  };
  document.addEventListener('click', e => {
    const b = e.target.closest && e.target.closest('#sketch button[data-sbir]');
    if (!b) return;
    if (b.dataset.sbir === 'undo') S.undo(); else if (b.dataset.sbir === 'clear') S.clear();
  });
  document.addEventListener('input', e => {
    if (e.target.matches && e.target.matches('#sketch input[data-sbir=size]')) S.size = +e.target.value;
  });
  // Ctrl+Z / Cmd+Z undoes the last stroke (not while typing in a text field).
  document.addEventListener('keydown', e => {
    if ((e.ctrlKey || e.metaKey) && !e.shiftKey && (e.key === 'z' || e.key === 'Z')) {
      const t = e.target;
      if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
      if (!S.strokes.length) return;
      e.preventDefault(); S.undo();
    }
  });
  setInterval(sync, 300);  // the canvas appears after the app mounts, and follows layout changes
  window.addEventListener('resize', sync);
})();
