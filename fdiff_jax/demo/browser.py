"""Drives `fdiff demo` in headless Chromium (selenium): the browser test and `--measure` use it.

Uses the system's Chromium and chromedriver (Debian: `apt-get install chromium
chromium-driver`); nothing is downloaded at run time.
"""

import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from fdiff_jax.errors import UserError

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'


def missing() -> str | None:
  """Why the browser cannot run here (selenium, Chromium or chromedriver absent), else None."""
  try:
    import selenium  # noqa: F401
  except ImportError:
    return 'selenium is not installed (pip install -e ".[test]")'
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.access(path, os.X_OK):
      return f'{path} not found (apt-get install chromium chromium-driver)'
  return None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class DemoServer:
  """`fdiff demo` in a subprocess on a free localhost port, ended by its PID on exit.

  `startup_s` is the time from starting the process to the page answering.
  """

  def __init__(self, workdir, *args, env=None, timeout=900):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}/'
    self._log = tempfile.TemporaryFile()
    start = time.perf_counter()
    command = [sys.executable, '-m', 'fdiff_jax', 'demo', '--workdir', workdir]
    self.process = subprocess.Popen(
      [*command, '--port', str(self.port), *args],
      stdout=self._log,
      stderr=subprocess.STDOUT,
      env=env,
    )
    try:
      self._wait_until_ready(timeout)
    except BaseException:
      self.stop()
      raise
    self.startup_s = time.perf_counter() - start

  def _wait_until_ready(self, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f'fdiff demo exited with {self.process.returncode}:\n{self.output()}')
      try:
        with urllib.request.urlopen(self.url, timeout=5) as response:
          if response.status == 200:
            return
      except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass
      time.sleep(0.2)
    raise TimeoutError(f'fdiff demo did not answer at {self.url} in {timeout} s:\n{self.output()}')

  def output(self) -> str:
    """What the server printed so far (stdout and stderr)."""
    self._log.seek(0)
    return self._log.read().decode(errors='replace')

  def stop(self):
    """Ends the server (SIGTERM, then SIGKILL after 30 s) and waits for it."""
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
    self._log.close()


class DemoPage:
  """A headless Chromium window on the demo; elements are found by the page's elem_ids."""

  def __init__(self, url, width=1400, height=1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage'):
      options.add_argument(arg)
    options.add_argument(f'--window-size={width},{height}')
    self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    self.driver.get(url)
    self.element('sample-generate')  # The page has rendered.

  def element(self, elem_id, css='', timeout=30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    selector = f'#{elem_id} {css}'.strip()
    return WebDriverWait(self.driver, timeout).until(
      lambda d: d.find_element(By.CSS_SELECTOR, selector)
    )

  def tab(self, title):
    from selenium.webdriver.common.by import By

    for button in self.driver.find_elements(By.CSS_SELECTOR, 'button[role=tab]'):
      if button.text.strip() == title:
        button.click()
        return
    raise ValueError(f'no tab {title!r}')

  def set_attribute(self, prefix, name, state):
    """Clicks `state` ('any' | 'yes' | 'no') of the tri-state control `prefix`-`name`."""
    self.element(f'{prefix}-{name}', f'label[data-testid="{state}-radio-label"]').click()

  def attribute(self, prefix, name) -> str:
    """The state the tri-state control `prefix`-`name` shows."""
    return self.element(f'{prefix}-{name}', 'label.selected').text.strip()

  def set_number(self, elem_id, value):
    from selenium.webdriver.common.keys import Keys

    field = self.element(elem_id, 'input[type=number]')
    field.send_keys(Keys.CONTROL, 'a')
    field.send_keys(str(value), Keys.TAB)

  def upload(self, elem_id, path, timeout=30):
    """Uploads a file to the file control `elem_id` and waits until the page lists it."""
    from selenium.webdriver.support.ui import WebDriverWait

    self.element(elem_id, 'input[type=file]').send_keys(os.path.abspath(path))
    listed = f'#{elem_id} [aria-label="{os.path.basename(path)}"]'
    WebDriverWait(self.driver, timeout).until(lambda d: d.find_elements('css selector', listed))

  def click(self, elem_id):
    self.element(elem_id).click()

  def image_src(self, elem_id):
    """The src of the image shown in `elem_id`, or None."""
    found = self.driver.find_elements('css selector', f'#{elem_id} img')
    return found[0].get_attribute('src') if found else None

  def wait_for_image(self, elem_id, previous=None, timeout=120):
    """(src, width, height) of a loaded image in `elem_id` whose src is not `previous`."""
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(driver):
      for img in driver.find_elements('css selector', f'#{elem_id} img'):
        src = img.get_attribute('src')
        if (
          src
          and src != previous
          and driver.execute_script(
            'return arguments[0].complete && arguments[0].naturalWidth > 0', img
          )
        ):
          size = driver.execute_script(
            'return [arguments[0].naturalWidth, arguments[0].naturalHeight]', img
          )
          return src, size[0], size[1]
      return False

    return WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(loaded)

  def status(self, elem_id) -> str:
    return self.element(elem_id).text.strip()

  def wait_for_status(self, elem_id, text, timeout=120) -> str:
    """The status line of `elem_id` once it contains `text`."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(self.driver, timeout).until(lambda d: text in self.status(elem_id))
    return self.status(elem_id)

  def generate(self, button, output, timeout=120):
    """Clicks `button`; (seconds from the click to the new image in `output`, src, w, h)."""
    previous = self.image_src(output)
    start = time.perf_counter()
    self.click(button)
    src, width, height = self.wait_for_image(output, previous, timeout)
    return time.perf_counter() - start, src, width, height

  @staticmethod
  def fetch(src) -> Image.Image:
    with urllib.request.urlopen(src, timeout=30) as response:
      return Image.open(io.BytesIO(response.read()))

  def screenshot(self, path):
    self.driver.execute_script('window.scrollTo(0, 0)')
    self.driver.save_screenshot(path)

  def close(self):
    self.driver.quit()


def measure(workdir, *, repeats=5, screenshot=None):
  """Prints start-up (cold and warm compilation cache) and click-to-image times of 4 samples."""
  from fdiff_jax import checkpoints
  from fdiff_jax.demo import engine

  reason = missing()
  if reason:
    raise UserError(f'--measure needs a browser: {reason}')
  workdir = engine.resolve_workdir(workdir)
  config = checkpoints.load_config(workdir)
  known = engine.known_attributes(config, engine.real_labels(config))[0]
  shown = [name for name in ('Smiling', 'Eyeglasses') if name in known]  # For the screenshot.
  cache = tempfile.mkdtemp(prefix='fdiff_demo_cache_')
  env = dict(os.environ, FDIFF_CACHE=cache, GRADIO_TEMP_DIR=os.path.join(cache, 'gradio'))
  try:
    with DemoServer(workdir, env=env) as server:
      cold = server.startup_s
    with DemoServer(workdir, env=env) as server:
      warm = server.startup_s
      page = DemoPage(server.url)
      try:
        page.set_number('sample-num', 4)
        for name in shown:
          page.set_attribute('sample', name, 'yes')
        clicks = []
        for seed in range(repeats + 1):
          page.set_number('sample-seed', seed)
          clicks.append(page.generate('sample-generate', 'sample-output')[0])
        if screenshot:
          page.screenshot(screenshot)
      finally:
        page.close()
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  print(f'start-up, empty compilation cache: {cold:.1f} s')
  print(f'start-up, warm compilation cache:  {warm:.1f} s')
  print(
    f'click to image, 4 samples, default sampler: first {clicks[0]:.2f} s, then median '
    f'{statistics.median(clicks[1:]):.2f} s (min {min(clicks[1:]):.2f}, max {max(clicks[1:]):.2f})'
  )
  if screenshot:
    print(f'wrote {screenshot}')
  return dict(cold_s=cold, warm_s=warm, clicks_s=clicks)


def pixels(image: Image.Image) -> np.ndarray:
  return np.asarray(image.convert('RGB'), np.int16)
