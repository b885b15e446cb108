"""The web chat page in headless Chromium (Debian's `chromium`, driven by Playwright).

The server serves the tiny model that memorised one Echo trace, so asking the memorised question
about the uploaded clip re-listens to 2.0-3.0 s and answers 4. The page must stream the reasoning,
highlight the span on the waveform as it happens, show the answer, and bring the thread back from
the SQLite checkpointer after a reload.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ECHO_CHOICES, ECHO_QUESTION
from served import SLOW, ThreadServer

from echo_agent.backends.transformers import TransformersBackend
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.serve import ServeConfig, create_app

CHROMIUM = os.environ.get("ECHO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# .ci/run installs chromium (or sets ECHO_SKIP_BROWSER when it cannot), so in CI a missing browser fails.
if os.environ.get("ECHO_SKIP_BROWSER") or (CHROMIUM is None and not os.environ.get("CI")):
    pytest.skip("no chromium executable (apt-get install chromium)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(echo_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    cfg = AgentConfig(sampling=SamplingParams(temperature=0.0, max_new_tokens=120))
    # 8 s: the 6 s clip fits, and the page must refuse a longer one before uploading it.
    data = tmp_path_factory.mktemp("web")
    config = ServeConfig(model_name="echo-model", data_dir=data, agent=cfg, max_audio_seconds=8)
    with ThreadServer(create_app(TransformersBackend.from_pretrained(echo_model[0]), config)) as s:
        yield s


def test_upload_ask_watch_the_span_and_reload_the_thread(
    server: ThreadServer, echo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    shots = Path(os.environ.get("ECHO_SCREENSHOTS", tmp_path))
    with sync_api.sync_playwright() as pw:
        flags = ["--no-sandbox", "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # fmt: skip
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.set_default_timeout(SLOW * 1000)  # a busy machine can starve the browser and the server
        sync_api.expect.set_options(timeout=SLOW * 1000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        page.set_input_files("#file", str(echo_model[1]))
        sync_api.expect(page.locator("#clipinfo")).to_have_text("6.00 s")
        page.fill("#question", ECHO_QUESTION)
        page.fill("#choices", " | ".join(ECHO_CHOICES))
        page.click("#ask")
        answer = page.locator(".turn .answer b")
        sync_api.expect(answer).to_have_text("4", timeout=SLOW * 1000)
        assert page.locator(".turn .answer").get_attribute("class") == "answer ok"  # 4 is one of the choices
        # The reasoning streamed in, with the re-listened span as a playable chip and a highlight.
        assert "<seg>2.0, 3.0</seg>" in page.locator(".turn .reasoning").inner_text()
        chips = page.locator(".span-chip")
        assert chips.count() == 1 and chips.first.inner_text().startswith("⟲ 2.00–3.00 s")
        assert page.locator("#wave").get_attribute("data-spans") == "1"
        # The highlight is really drawn: canvas pixels inside the span are orange-tinted, outside are not.
        tint = page.evaluate(
            """() => { const c = document.getElementById('wave'), g = c.getContext('2d');
                 const at = (s) => g.getImageData(Math.round(s / 6 * c.width), 2, 1, 1).data;
                 return [Array.from(at(2.5)), Array.from(at(0.5))]; }"""
        )
        inside, outside = tint
        assert inside[0] > inside[2] + 40 and outside[0] < 40, tint
        chips.first.click()
        sync_api.expect(page.locator("#status")).to_contain_text("playing main 2.00–3.00 s")
        page.screenshot(path=str(shots / "web-answer.png"))

        # The thread persists (the server's SQLite checkpointer; the page keeps the ids it started): reload, reopen.
        page.reload()
        thread = page.locator("#threads li").first
        sync_api.expect(thread).to_contain_text(ECHO_QUESTION[:30])
        thread.click()
        sync_api.expect(page.locator(".turn .answer b")).to_have_text("4")
        assert page.locator(".span-chip").count() == 1
        sync_api.expect(page.locator("#clipinfo")).to_have_text("6.00 s")  # the clip came back from the server
        page.screenshot(path=str(shots / "web-thread.png"))

        # Recording (Chromium's fake microphone plays a tone): the clip is encoded as WAV and drawn.
        page.click("#record")
        sync_api.expect(page.locator("#record")).to_have_text("■ Stop")
        page.wait_for_timeout(1200)
        page.click("#record")
        sync_api.expect(page.locator("#status")).to_have_text("recorded a clip")
        seconds = float(page.locator("#clipinfo").inner_text().removesuffix(" s"))
        assert 0.5 < seconds < 5.0
        page.screenshot(path=str(shots / "web-recorded.png"))
        assert errors == []
        browser.close()


def test_limits_are_checked_before_uploading_and_off_choice_answers_are_not_green(
    server: ThreadServer, echo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    from conftest import write_beeps

    long_clip = write_beeps(tmp_path / "long.wav", 10.0, [(1.0, 0.2)])
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(SLOW * 1000)
        sync_api.expect.set_options(timeout=SLOW * 1000)
        posts: list[str] = []
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        page.goto(server.url)
        page.wait_for_function("() => st.limits !== null")
        # Over --max-audio-seconds (8 s here): the page says so, names the flag, and sends nothing.
        page.set_input_files("#file", str(long_clip))
        sync_api.expect(page.locator("#status")).to_contain_text("over the server's limit of 8 s (--max-audio-seconds)")
        sync_api.expect(page.locator("#clipinfo")).to_have_text("no clip")
        page.fill("#question", ECHO_QUESTION)
        page.click("#ask")
        sync_api.expect(page.locator("#status")).to_have_text("upload or record a clip first")
        assert posts == []
        # An answer that is none of the choices is marked so, never shown in the green of a chosen one.
        page.set_input_files("#file", str(echo_model[1]))
        sync_api.expect(page.locator("#clipinfo")).to_have_text("6.00 s")
        choices = ["3", "5"]
        page.fill("#choices", " | ".join(choices))
        page.click("#ask")
        shown = page.locator(".turn .answer")
        sync_api.expect(shown).to_have_class(re.compile(r"^answer (ok|off|none)$"))
        answer = page.locator(".turn .answer b").inner_text()
        wanted = "answer ok" if answer in choices else ("answer none" if answer == "No answer" else "answer off")
        assert shown.get_attribute("class") == wanted, (answer, shown.get_attribute("class"))
        if wanted == "answer off":
            assert "(not one of the choices)" in shown.inner_text()
        assert len(posts) == 1
        browser.close()
