"""The Gradio page of `fdiff demo`: Sample, Interpolate and Edit tabs over a `DemoEngine`.

gradio is imported inside the functions here, so the core install never needs it.
Every handler turns a UserError (or an unexpected failure) into a status line on
the page; the server keeps running.
"""

import errno
import os
import signal
import socket
import sys
import tempfile
import time
import traceback

import numpy as np

from fdiff_jax import images
from fdiff_jax.demo import engine as engine_lib
from fdiff_jax.errors import UserError

STATE_LABELS = (('any', 'any'), ('yes', 'yes'), ('no', 'no'))
CHANGE_LABELS = (('keep', 'any'), ('yes', 'yes'), ('no', 'no'))
CSS = '.attribute-radio .wrap { flex-wrap: nowrap; gap: 4px; } .attribute-radio label { padding: 4px 8px; }'


def require_gradio():
  """The gradio module, or a UserError saying how to install it."""
  try:
    import gradio
  except ImportError:
    raise UserError(
      'fdiff demo needs gradio, an optional extra: pip install -e ".[demo]"'
    ) from None
  return gradio


def serve(workdir, classifier=None, *, host='127.0.0.1', port=7860, share=False):
  """Loads the model, compiles its programs (cached under $FDIFF_CACHE), then serves the page."""
  from fdiff_jax import checkpoints
  from fdiff_jax.metrics import inception

  workdir = engine_lib.resolve_workdir(workdir)
  checkpoints.load_config(workdir)  # Bad flags stop here, before anything slow.
  engine_lib.check_classifier(classifier)
  _check_port(host, port)
  require_gradio()
  cache_dir = os.path.join(inception.default_cache_dir(), 'jax_compilation_cache')
  engine_lib.enable_compilation_cache(cache_dir)
  start = time.perf_counter()
  engine = engine_lib.DemoEngine(workdir, classifier)
  say(f'loaded {workdir} (step {engine.step}); controls: {engine.known_source}')
  say(f'compiling the sampling programs of the default settings (cached in {cache_dir}) ...')
  engine.warm_up(say)
  say(f'ready after {time.perf_counter() - start:.1f} s')
  with tempfile.TemporaryDirectory(prefix='fdiff_demo_') as scratch:
    page = build(engine, scratch)
    # SIGTERM shuts the server down like Ctrl-C, so the scratch folder is removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
      page.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, css=CSS, quiet=False
      )
    except OSError as e:  # Port taken since the check, or no such host.
      raise UserError(f'cannot serve on {host}:{port} ({e}); check --host and --port') from None


def _check_port(host, port):
  """A UserError now, rather than after compiling, if the server could not listen there."""
  try:
    with socket.socket() as s:
      s.bind((host, port))
  except (OSError, OverflowError) as e:
    taken = isinstance(e, OSError) and e.errno in (errno.EADDRINUSE, errno.EACCES)
    remedy = 'choose another --port' if taken else 'check --host and --port'
    reason = getattr(e, 'strerror', None) or e
    raise UserError(f'cannot serve on {host}:{port} ({reason}); {remedy}') from None


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def say(line):
  print(f'fdiff demo: {line}', file=sys.stderr, flush=True)


def build(engine: engine_lib.DemoEngine, scratch: str):
  """The gr.Blocks page; GIFs are written under `scratch`."""
  import gradio as gr

  d = engine.defaults
  with gr.Blocks(title='fdiff demo', analytics_enabled=False, delete_cache=(600, 3600)) as page:
    gr.Markdown(
      f'### fdiff demo: `{engine.workdir}` (step {engine.step})\n'
      f'Attributes: {engine.known_source}. Each is *yes* (present), *no* (absent) or '
      '*any* (unspecified). Guidance w: 0 unconditional, 1 plain conditional, more: '
      'stronger attributes.'
    )
    with gr.Tab('Sample', id='sample'):
      with gr.Row():
        with gr.Column(scale=3):
          real = gr.Button(
            'Random real combination',
            elem_id='sample-real',
            interactive=engine.labels.eval_rows is not None,
          )
          if engine.labels.eval_rows is None:
            gr.Markdown(f'(Random real combinations need the dataset: {engine.labels.source}.)')
          sample_attrs = attribute_controls(gr, engine, 'sample', STATE_LABELS)
        with gr.Column(scale=2):
          sample_opts = generation_options(gr, engine, 'sample', engine_lib.SOLVERS)
          num = gr.Slider(
            1, engine_lib.MAX_IMAGES, d['num'], step=1, label='Images', elem_id='sample-num'
          )
          sample_button = gr.Button('Generate', variant='primary', elem_id='sample-generate')
          sample_out = gr.Image(
            label='Samples', format='png', interactive=False, elem_id='sample-output'
          )
          sample_status = gr.Markdown(elem_id='sample-status')

    with gr.Tab('Interpolate', id='interpolate'):
      with gr.Row():
        with gr.Column(scale=3):
          gr.Markdown('**From**')
          start_attrs = attribute_controls(gr, engine, 'from', STATE_LABELS)
          gr.Markdown('**To**')
          end_attrs = attribute_controls(gr, engine, 'to', STATE_LABELS)
        with gr.Column(scale=2):
          interp_opts = generation_options(gr, engine, 'interp', engine_lib.DETERMINISTIC_SOLVERS)
          frames = gr.Slider(
            2, engine_lib.MAX_FRAMES, d['frames'], step=1, label='Frames', elem_id='interp-frames'
          )
          interp_button = gr.Button('Interpolate', variant='primary', elem_id='interp-generate')
          strip = gr.Image(label='Strip', format='png', interactive=False, elem_id='interp-strip')
          gif = gr.Image(label='Animation', interactive=False, elem_id='interp-gif')
          interp_status = gr.Markdown(elem_id='interp-status')

    with gr.Tab('Edit', id='edit'):
      with gr.Row():
        with gr.Column(scale=3):
          photo = gr.File(label='Photo (JPEG or PNG)', type='filepath', elem_id='edit-photo')
          gr.Markdown("**The photo's attributes**")
          source_attrs = attribute_controls(gr, engine, 'source', STATE_LABELS)
          read = gr.Button(
            'Read them with the classifier',
            elem_id='edit-read',
            visible=engine.classifier is not None,
          )
          gr.Markdown('**Change**')
          change_attrs = attribute_controls(gr, engine, 'change', CHANGE_LABELS)
        with gr.Column(scale=2):
          method = gr.Radio(
            list(engine_lib.EDIT_METHODS), value=d['method'], label='Method', elem_id='edit-method'
          )
          strength = gr.Slider(
            0.1, 1.0, d['strength'], step=0.1, label='sdedit strength', elem_id='edit-strength'
          )
          edit_opts = generation_options(gr, engine, 'edit', ())
          edit_button = gr.Button('Edit', variant='primary', elem_id='edit-generate')
          panel = gr.Image(
            label='original | reconstruction | edit',
            format='png',
            interactive=False,
            elem_id='edit-output',
          )
          edit_status = gr.Markdown(elem_id='edit-status')

    def on_sample(v, progress=gr.Progress()):
      progress(0, desc='sampling')
      return engine.sample(
        [v[c] for c in sample_attrs],
        num=v[num],
        progress=_batches(progress),
        **{k: v[c] for k, c in sample_opts.items()},
      )

    def on_interpolate(v, progress=gr.Progress()):
      progress(0, desc='sampling the frames')
      rows = engine.interpolate(
        [v[c] for c in start_attrs],
        [v[c] for c in end_attrs],
        frames=v[frames],
        progress=_batches(progress),
        **{k: v[c] for k, c in interp_opts.items()},
      )
      path = os.path.join(scratch, f'interpolation_{time.time_ns()}.gif')
      images.save_gif(path, images.animation_frames(rows), scale=engine.scale)
      return engine.enlarge(images.grid_image(rows)), path

    def on_edit(v, progress=gr.Progress()):
      progress(0, desc='inverting and editing')
      return engine.edit(
        engine.load_photo(v[photo]),
        [v[c] for c in source_attrs],
        [v[c] for c in change_attrs],
        method=v[method],
        strength=v[strength],
        progress=_batches(progress),
        **{k: v[c] for k, c in edit_opts.items()},
      )

    rng = np.random.default_rng()
    _listen(
      gr,
      sample_button,
      on_sample,
      {*sample_attrs, *sample_opts.values(), num},
      [sample_out],
      sample_status,
      timed=True,
    )
    _listen(
      gr,
      interp_button,
      on_interpolate,
      {*start_attrs, *end_attrs, *interp_opts.values(), frames},
      [strip, gif],
      interp_status,
      timed=True,
    )
    _listen(
      gr,
      edit_button,
      on_edit,
      {photo, method, strength, *source_attrs, *change_attrs, *edit_opts.values()},
      [panel],
      edit_status,
      timed=True,
    )
    _listen(
      gr,
      real,
      lambda v, p: engine.random_real(rng),
      set(),
      sample_attrs,
      sample_status,
      timed=False,
    )
    _listen(
      gr,
      read,
      lambda v, p: engine.read_attributes(v[photo]),
      {photo},
      source_attrs,
      edit_status,
      timed=False,
    )
  return page


def attribute_controls(gr, engine, prefix, labels):
  """One tri-state radio per known attribute, grouped under titles; in `engine.known` order."""
  controls = {}
  for title, names in engine.groups:
    with gr.Group():
      gr.Markdown(f'*{title}*', padding=True)
      with gr.Row():
        for name in names:
          controls[name] = gr.Radio(
            list(labels),
            value='any',
            label=name.replace('_', ' '),
            elem_id=f'{prefix}-{name}',
            elem_classes=['attribute-radio'],
            min_width=220,
          )
  return [controls[name] for name in engine.known]


def generation_options(gr, engine, prefix, solvers):
  """{keyword of the engine: component}: guidance, sampler (when there is a choice), steps, seed."""
  d = engine.defaults
  options = {}
  with gr.Row():
    options['guidance'] = gr.Number(d['guidance'], label='Guidance w', elem_id=f'{prefix}-guidance')
    options['seed'] = gr.Number(d['seed'], label='Seed', precision=0, elem_id=f'{prefix}-seed')
  with gr.Row():
    if solvers:
      solver = d['solver'] if d['solver'] in solvers else solvers[0]
      options['solver'] = gr.Dropdown(
        list(solvers), value=solver, label='Sampler', elem_id=f'{prefix}-solver'
      )
    options['steps'] = gr.Slider(
      1, engine_lib.MAX_STEPS, d['steps'], step=1, label='Steps', elem_id=f'{prefix}-steps'
    )
  return options


def _batches(progress):
  """A Sampler progress callback that moves the page's progress bar per finished batch."""
  return lambda done, total: progress((done, total), desc='batches', unit='batches')


def _listen(gr, button, fn, inputs, outputs, status, timed):
  """button.click -> fn(values by component) -> outputs, plus a status line on `status`."""

  def handler(values, progress):
    start = time.perf_counter()
    try:
      result = fn(values, progress)
    except UserError as e:
      return _failed(gr, outputs, f'**Error:** {e}')
    except Exception as e:  # A bug: keep the traceback in the log, the server running.
      traceback.print_exc()
      return _failed(gr, outputs, f'**Error:** {type(e).__name__}: {e} (details in the server log)')
    result = list(result) if isinstance(result, (list, tuple)) else [result]
    took = f'done in {time.perf_counter() - start:.2f} s' if timed else ''
    return [*result, took]

  if inputs:
    on_click = lambda values, progress=gr.Progress(): handler(values, progress)
  else:  # gradio calls it with no arguments.
    on_click = lambda progress=gr.Progress(): handler({}, progress)
  button.click(on_click, inputs=inputs or None, outputs=[*outputs, status])


def _failed(gr, outputs, message):
  return [gr.update() for _ in outputs] + [message]
