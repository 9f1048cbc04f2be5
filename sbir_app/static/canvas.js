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
  // ---- tools: pen or eraser; history of whole stroke lists, so Clear and the eraser
  // can be undone and anything undone redone.
  S.tool = 'pen'; S.past = []; S.future = [];
  function remember() { S.past.push(S.strokes.slice()); if (S.past.length > 200) S.past.shift(); S.future = []; }
  function show(strokes) {  // put a stroke list on the canvas and search with it
    S.strokes = strokes; S.cur = null; sync(); redraw(); send();
    if (!strokes.length) {  // nothing drawn: the explanation panels empty too
      const b = document.querySelector('#clear-trigger');
      if (b) b.click();
    }
  }
  function near(st, p, r) {  // does stroke `st` pass within r px of point p?
    const q = st.points, rr = (r + st.size / 2) ** 2;
    for (let i = 0; i < q.length; i++) {
      const a = q[i], b = q[Math.min(i + 1, q.length - 1)];
      const dx = b[0] - a[0], dy = b[1] - a[1], L = dx * dx + dy * dy;
      const t = L ? Math.max(0, Math.min(1, ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / L)) : 0;
      const x = a[0] + t * dx - p[0], y = a[1] + t * dy - p[1];
      if (x * x + y * y <= rr) return true;
    }
    return false;
  }
  function erase(p) {  // the stroke eraser: a touched line goes whole
    const keep = S.strokes.filter(st => !near(st, p, Math.max(8, S.size)));
    if (keep.length === S.strokes.length) return;
    S.strokes = keep; S.erased = true; redraw();
  }
  document.addEventListener('pointerdown', e => {
    if (e.button !== 0 || !(e.target instanceof HTMLCanvasElement) || !e.target.closest('#sketch')) return;
    sync();
    e.preventDefault();
    try { e.target.setPointerCapture(e.pointerId); } catch (_) {}
    S.pid = e.pointerId;
    if (S.tool === 'eraser') {
      S.before = S.strokes.slice(); S.erased = false; S.erasing = true; erase(pt(e));
      return;
    }
    S.cur = {points: [pt(e)], size: S.size};
    const g = ctx(); g.fillStyle = '#000'; dot(g, S.cur.points[0], S.size);
  });
  document.addEventListener('pointermove', e => {
    if (e.pointerId !== S.pid) return;
    if (S.erasing) { erase(pt(e)); return; }
    if (!S.cur) return;
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
    if (e.pointerId !== S.pid) return;
    S.pid = null;
    if (S.erasing) {  // one search per eraser gesture, and only when a line went
      S.erasing = false;
      if (S.erased) { const now = S.strokes; S.strokes = S.before; remember(); show(now); }
      return;
    }
    if (!S.cur) return;
    const st = S.cur; S.cur = null;
    remember(); S.strokes = S.strokes.concat([st]);
    send();
  }
  document.addEventListener('pointerup', end);
  document.addEventListener('pointercancel', end);
  S.clear = () => { if (S.strokes.length) remember(); show([]); };
  S.undo = () => { if (!S.past.length) return; S.future.push(S.strokes); show(S.past.pop()); };
  S.redo = () => { if (!S.future.length) return; S.past.push(S.strokes); show(S.future.pop()); };
  S.setTool = (tool) => {
    S.tool = tool;
    document.querySelectorAll('#sketch button[data-sbir=pen], #sketch button[data-sbir=eraser]').forEach(b =>
      b.setAttribute('aria-pressed', String(b.dataset.sbir === tool)));
    if (S.canvas) S.canvas.style.cursor = tool === 'eraser' ? 'cell' : 'crosshair';
  };
  // An example (or any stroke JSON from the server): fit it into the canvas and draw it.
  S.load = (value) => {
    let d = value;
    try { if (typeof d === 'string') d = d.trim() ? JSON.parse(d) : []; } catch (_) { return; }
    let strokes = Array.isArray(d) ? d : ((d && d.strokes) || []);
    strokes = strokes.filter(s => Array.isArray(s) && s.length).map(s =>
      (s.length === 2 && Array.isArray(s[0]) && s[0].length !== 2) ? s[0].map((x, i) => [x, s[1][i]]) : s);
    sync();
    const all = strokes.flat();
    remember();
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
  const ACTIONS = {undo: () => S.undo(), redo: () => S.redo(), clear: () => S.clear(),
                   pen: () => S.setTool('pen'), eraser: () => S.setTool('eraser')};
  document.addEventListener('click', e => {
    const b = e.target.closest && e.target.closest('#sketch button[data-sbir]');
    if (b && ACTIONS[b.dataset.sbir]) ACTIONS[b.dataset.sbir]();
  });
  document.addEventListener('input', e => {
    if (e.target.matches && e.target.matches('#sketch input[data-sbir=size]')) S.size = +e.target.value;
  });
  // Ctrl+Z / Cmd+Z undoes, Ctrl+Y / Ctrl+Shift+Z redoes (not while typing in a text field).
  document.addEventListener('keydown', e => {
    const t = e.target;
    if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
    if (!(e.ctrlKey || e.metaKey)) return;
    const key = e.key.toLowerCase();
    if (key === 'z' && !e.shiftKey && S.past.length) { e.preventDefault(); S.undo(); }
    else if ((key === 'y' || (key === 'z' && e.shiftKey)) && S.future.length) { e.preventDefault(); S.redo(); }
  });

  // ---- "Why did it match?" opens as a panel where the eye is (beside the results on wide
  // screens, over the page on phones) and closes with Esc, its button or a click outside.
  const why = () => document.querySelector('#why-col');
  S.openWhy = () => {
    const w = why();
    if (!w) return;
    w.setAttribute('role', 'dialog'); w.setAttribute('aria-label', 'Why did it match?');
    document.body.classList.add('sbir-why-open');
    w.scrollTop = 0;
    const c = w.querySelector('.sbir-close');
    if (c) c.focus({preventScroll: true});
  };
  S.closeWhy = () => {  // and the keyboard goes back to the result that opened it
    document.body.classList.remove('sbir-why-open');
    if (S.opener && S.opener.isConnected) S.opener.focus({preventScroll: true});
  };
  document.addEventListener('click', e => {
    const t = e.target;
    if (!t.closest) return;
    if (t.closest('#results .thumbnail-item')) { S.opener = t.closest('#results .thumbnail-item'); S.openWhy(); return; }
    const s = t.closest('#sbir-strip button[data-i]');
    if (s) {  // the phone's strip stands for the results grid: click the real result
      const item = document.querySelectorAll('#results .thumbnail-item')[+s.dataset.i];
      if (item) item.click();
      return;
    }
    if (!document.body.classList.contains('sbir-why-open')) return;
    if (t.closest('.sbir-close') || !t.closest('#why-col')) S.closeWhy();
  }, true);
  document.addEventListener('keydown', e => {
    if (e.key === 'Escape' && document.body.classList.contains('sbir-why-open')
        && !document.fullscreenElement) S.closeWhy();
  });

  // ---- the results, for screen readers and phones: each named by its caption (its place
  // and class), and on phones a strip of the first ones under the canvas, fixed at the bottom.
  let stripSig = '';
  function results() {
    const items = [...document.querySelectorAll('#results .thumbnail-item')];
    const caps = items.map(b => { const c = b.querySelector('.caption-label'); return c ? c.textContent.trim() : ''; });
    items.forEach((b, i) => {
      if (!caps[i]) return;
      if (b.getAttribute('aria-label') !== caps[i]) b.setAttribute('aria-label', caps[i]);
      const im = b.querySelector('img');
      if (im && im.alt !== caps[i]) im.alt = caps[i];
    });
    let strip = document.getElementById('sbir-strip');
    if (!strip) {
      strip = document.createElement('nav'); strip.id = 'sbir-strip'; strip.setAttribute('aria-label', 'First results');
      document.body.appendChild(strip);
    }
    const first = items.slice(0, 4).map((b, i) => [(b.querySelector('img') || {}).src || '', caps[i]]);
    const sig = JSON.stringify(first);
    if (sig === stripSig) return;
    stripSig = sig;
    strip.replaceChildren(...first.filter(f => f[0]).map(([src, cap], i) => {
      const b = document.createElement('button'); b.type = 'button'; b.dataset.i = i; b.setAttribute('aria-label', cap);
      const im = document.createElement('img'); im.src = src; im.alt = '';
      const sp = document.createElement('span'); sp.textContent = cap;
      b.append(im, sp); return b;
    }));
  }
  let pending = false;
  new MutationObserver(() => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; results(); });
  }).observe(document.documentElement, {childList: true, subtree: true, attributes: true, attributeFilter: ['src']});
  // The strip steps aside while the results grid itself is on screen.
  let watched = null;
  const seen = new IntersectionObserver(es => {
    for (const en of es) document.body.classList.toggle('sbir-results-seen', en.isIntersecting);
  });
  function page() {
    const grid = document.querySelector('#results');
    if (grid && grid !== watched) { if (watched) seen.unobserve(watched); seen.observe(grid); watched = grid; }
    const st = document.querySelector('#status');  // status changes are read out
    if (st && st.getAttribute('aria-live') !== 'polite') { st.setAttribute('aria-live', 'polite'); st.setAttribute('role', 'status'); }
  }

  // ---- k typed out of range is clamped quietly; a half-typed or non-number entry keeps the
  // last value (the slider would refuse it with an error and the results would go).
  const K = '#k input[type=number]';
  document.addEventListener('input', e => {
    const t = e.target;
    if (!t.matches || !t.matches(K)) return;
    const v = parseFloat(t.value);
    if (t.value === '' || !isFinite(v)) { e.stopImmediatePropagation(); return; }
    const lo = +(t.min || 1), hi = +(t.max || 48), c = Math.min(hi, Math.max(lo, Math.round(v)));
    if (c !== v) t.value = String(c);
  }, true);
  document.addEventListener('focusout', e => {
    const t = e.target;
    if (!t.matches || !t.matches(K) || (t.value !== '' && isFinite(parseFloat(t.value)))) return;
    const r = document.querySelector('#k input[type=range]');
    t.value = r ? r.value : '12';
  }, true);
  setInterval(page, 500);
  setInterval(sync, 300);  // the canvas appears after the app mounts, and follows layout changes
  window.addEventListener('resize', sync);
})();
