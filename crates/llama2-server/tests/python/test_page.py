"""The chat page at `/`, driven in Debian's headless Chromium via Selenium.

Checks what a person would: the model name shows up, a message gets a
streamed answer that grows in place, errors show on the error line, and
Clear forgets the conversation. Skips when chromium / chromedriver (Debian
packages `chromium`, `chromium-driver`) or selenium are missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 20


@pytest.fixture(scope="module")
def driver():
    profile = tempfile.mkdtemp(prefix="llama2-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1100,800"):
        options.add_argument(arg)
    try:
        d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as e:  # a broken browser install is not a server bug
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"could not start headless chromium: {e}")
    d.set_script_timeout(WAIT_S)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(driver, server_url, api_key):
    """The page freshly loaded, with the API key typed in when there is one,
    and the model name shown (which needs the key)."""
    driver.get(server_url + "/")
    # localStorage survives reloads; start every test from the same state.
    driver.execute_script("localStorage.clear()")
    driver.get(server_url + "/")
    if api_key:
        field = driver.find_element(By.ID, "api-key")
        field.send_keys(api_key)
        field.send_keys(Keys.TAB)  # "change" fires on blur; the page refetches /v1/models
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "model").text.strip())
    return driver


def set_field(driver, element_id, value):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def wait_idle(driver):
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "false")


def assistant_texts(driver):
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")]


# Records the length of the newest assistant bubble at every DOM change,
# from inside the page: polling over WebDriver is far slower than this model
# streams, and would miss the intermediate states.
RECORD_LENGTHS = """
window.__lengths = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('#messages .msg.assistant');
  if (bubbles.length) window.__lengths.push(bubbles[bubbles.length - 1].textContent.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def test_model_name_shown(page, model_id):
    assert page.find_element(By.ID, "model").text.strip() == model_id
    assert page.find_element(By.ID, "error").text.strip() == ""


def test_streamed_answer_grows(page, model_id):
    set_field(page, "max-tokens", 64)
    set_field(page, "temperature", 0.8)
    page.execute_script(RECORD_LENGTHS)
    page.find_element(By.ID, "message").send_keys("Tell me a story about a dragon.")
    page.find_element(By.ID, "send").click()

    WebDriverWait(page, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .msg.user"))
    wait_idle(page)

    users = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#messages .msg.user")]
    assert users == ["Tell me a story about a dragon."]
    answers = assistant_texts(page)
    assert len(answers) == 1 and answers[0].strip(), f"no answer; error line: {page.find_element(By.ID, 'error').text!r}"
    assert page.find_element(By.ID, "error").text.strip() == ""

    lengths = [n for n in page.execute_script("return window.__lengths") if n > 0]
    assert lengths, "assistant bubble never had text"
    # Growing means: non-decreasing, and seen at two different sizes, unless
    # the whole answer landed in one network read (then only the end state
    # can be checked, which the assertions above did).
    assert lengths == sorted(lengths), f"bubble text shrank while streaming: {lengths}"
    if len(set(lengths)) < 2:
        print(f"answer arrived in one piece; growth not observable ({lengths})")
    assert page.find_element(By.ID, "model").text.strip() == model_id
    # The input is cleared and the controls are back to idle.
    assert page.find_element(By.ID, "message").get_attribute("value") == ""
    assert page.find_element(By.ID, "send").is_enabled()
    assert not page.find_element(By.ID, "stop").is_enabled()


def test_enter_sends_and_conversation_continues(page):
    set_field(page, "max-tokens", 16)
    box = page.find_element(By.ID, "message")
    box.send_keys("First line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line")
    # Shift+Enter is a newline, not a send.
    assert box.get_attribute("value") == "First line\nsecond line"
    assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg.user")
    box.send_keys(Keys.ENTER)
    wait_idle(page)
    assert len(assistant_texts(page)) == 1

    box.send_keys("And then?", Keys.ENTER)
    WebDriverWait(page, WAIT_S).until(lambda d: len(assistant_texts(d)) == 2)
    wait_idle(page)
    users = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#messages .msg.user")]
    assert users == ["First line\nsecond line", "And then?"]
    assert all(t.strip() for t in assistant_texts(page))


def test_error_line_on_bad_request(page):
    set_field(page, "temperature", -1)  # the page leaves validation to the server
    page.find_element(By.ID, "message").send_keys("Hello")
    page.find_element(By.ID, "send").click()
    WebDriverWait(page, WAIT_S).until(lambda d: d.find_element(By.ID, "error").text.strip())
    wait_idle(page)
    error = page.find_element(By.ID, "error").text
    assert "400" in error, error
    # The failed turn is undone and its text handed back for a retry.
    assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg.user")
    assert page.find_element(By.ID, "message").get_attribute("value") == "Hello"

    set_field(page, "temperature", 0.5)
    set_field(page, "max-tokens", 8)
    page.find_element(By.ID, "send").click()
    wait_idle(page)
    assert page.find_element(By.ID, "error").text.strip() == ""
    assert len(assistant_texts(page)) == 1


def test_clear_and_stop(page):
    set_field(page, "max-tokens", 64)
    page.find_element(By.ID, "message").send_keys("Tell me a story.", Keys.ENTER)
    # Stop may land after the answer finished (the model is fast); either
    # way the page must end idle with no error.
    try:
        page.find_element(By.ID, "stop").click()
    except Exception:
        pass
    wait_idle(page)
    assert page.find_element(By.ID, "error").text.strip() == ""
    assert page.find_elements(By.CSS_SELECTOR, "#messages .msg")

    page.find_element(By.ID, "clear").click()
    assert not page.find_elements(By.CSS_SELECTOR, "#messages .msg")


def test_api_key_remembered(driver, server_url):
    driver.get(server_url + "/")
    driver.execute_script("localStorage.setItem('llama2-rs.apiKey', 'remembered-key')")
    driver.get(server_url + "/")
    assert driver.find_element(By.ID, "api-key").get_attribute("value") == "remembered-key"
    driver.execute_script("localStorage.clear()")


def test_page_is_self_contained(driver, server_url):
    """No CDN, no external fetches: the page must work offline."""
    driver.get(server_url + "/")
    urls = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    foreign = [u for u in urls if not u.startswith(server_url)]
    assert not foreign, foreign
