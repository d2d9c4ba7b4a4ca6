"""The Python SDK against a real `mxc-vm serve` (process tiers)."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mxc_vm import AsyncClient, Client, MxcVmError, Sandbox  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BIN = os.environ.get("MXC_VM_BIN") or os.path.join(ROOT, "target", "debug", "mxc-vm")


class ServeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="mxc-sdk-py-")
        cls.socket = os.path.join(cls.dir, "api.sock")
        cls.server = subprocess.Popen(
            [BIN, "serve", "--socket", cls.socket], stdout=subprocess.PIPE
        )
        line = cls.server.stdout.readline()
        assert json.loads(line)["type"] == "listening", line
        cls.client = Client(socket_path=cls.socket)
        cls.work = os.path.join(cls.dir, "work")
        os.makedirs(os.path.join(cls.work, "secret"))
        with open(os.path.join(cls.work, "secret", "key"), "w") as f:
            f.write("top secret")
        cls.policy = {
            "version": "1",
            "filesystem": {"readwrite": [cls.work], "denied": [cls.work + "/secret"]},
        }

    @classmethod
    def tearDownClass(cls):
        cls.server.send_signal(signal.SIGTERM)
        code = cls.server.wait(timeout=30)
        cls.server.stdout.close()
        shutil.rmtree(cls.dir, ignore_errors=True)
        assert code == 128 + signal.SIGTERM, code

    def test_health(self):
        self.assertEqual(self.client.health(), {"status": "ok"})

    def test_a_request_closes_its_socket_when_its_response_ends(self):
        import gc
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for _ in range(3):
                self.client.health()
            with self.assertRaises(MxcVmError):
                self.client.sandbox("no-such-sandbox")
            gc.collect()
        unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        self.assertEqual(unclosed, [])

    def test_exec_streams_output_and_passes_stdin_and_exit_codes(self):
        for backend in ("process", "bubblewrap"):
            with Sandbox.create(self.client, backend=backend, policy=self.policy) as sb:
                seen = []
                r = sb.exec(
                    ["sh", "-c", "echo one; cat; echo two >&2; exit 3"],
                    stdin="piped\n",
                    on_stdout=lambda c: seen.append(("out", c)),
                    on_stderr=lambda c: seen.append(("err", c)),
                )
                self.assertEqual((r.exit_code, r.stdout, r.stderr), (3, b"one\npiped\n", b"two\n"))
                self.assertFalse(r.ok)
                self.assertEqual(b"".join(c for k, c in seen if k == "out"), r.stdout)
                r = sb.exec(["sleep", "5"], timeout_ms=200)
                self.assertTrue(r.timed_out)
                self.assertEqual(sb.exec(["true"]).exit_code, 0)
                self.assertEqual(sb.refresh()["execs"], 3)

    def test_files_follow_the_policy(self):
        with Sandbox.create(self.client, backend="process", policy=self.policy) as sb:
            path = self.work + "/hello.txt"
            self.assertEqual(sb.files.write(path, "hi there"), 8)
            self.assertEqual(sb.files.read(path), b"hi there")
            self.assertEqual(sb.exec(["cat", path]).stdout, b"hi there")
            names = [e["name"] for e in sb.files.list(self.work)]
            self.assertEqual(names, ["hello.txt"])
            with self.assertRaises(MxcVmError) as denied:
                sb.files.read(self.work + "/secret/key")
            self.assertEqual((denied.exception.status, denied.exception.code), (403, "path_denied"))
            self.assertIn("rule:", denied.exception.message)
            with self.assertRaises(MxcVmError) as outside:
                sb.files.write("/etc/hostname", "x")
            self.assertEqual(outside.exception.code, "path_denied")

    def test_errors_are_typed(self):
        with self.assertRaises(MxcVmError) as bad:
            self.client.create_sandbox(policy={"version": "1", "filesystem": {"deny": []}})
        self.assertEqual((bad.exception.status, bad.exception.code), (400, "policy_validation"))
        with self.assertRaises(MxcVmError) as missing:
            self.client.sandbox("sb-none")
        self.assertEqual(missing.exception.status, 404)
        sb = self.client.create_sandbox(backend="process")
        sb.close()
        sb.close()  # a second close is fine
        with self.assertRaises(MxcVmError) as gone:
            sb.exec(["true"])
        self.assertEqual(gone.exception.code, "not_found")

    def test_execs_run_side_by_side_and_take_signals(self):
        import threading

        with Sandbox.create(self.client, backend="process") as sb:
            started = threading.Event()
            ids = []
            result = {}

            def run():
                result["r"] = sb.exec(
                    ["sh", "-c", "trap 'echo got-term; exit 7' TERM; touch /tmp/t; "
                     "while :; do sleep 0.05; done"],
                    on_start=lambda i: (ids.append(i), started.set()),
                )

            t = threading.Thread(target=run)
            t.start()
            self.assertTrue(started.wait(20))
            # Another exec runs while the first one does.
            for _ in range(400):
                if sb.exec(["test", "-e", "/tmp/t"]).exit_code == 0:
                    break
            self.assertEqual([e["id"] for e in sb.execs()], ids)
            sb.signal(ids[0], "TERM")
            t.join(30)
            self.assertEqual((result["r"].exit_code, result["r"].stdout), (7, b"got-term\n"))
            with self.assertRaises(MxcVmError) as ended:
                sb.signal(ids[0], "TERM")
            self.assertEqual(ended.exception.status, 404)
            with self.assertRaises(MxcVmError) as bad:
                sb.signal(ids[0], "SIGFOO")
            self.assertEqual((bad.exception.status, bad.exception.code), (400, "malformed_request"))

    def test_asyncio(self):
        async def main():
            client = AsyncClient(socket_path=self.socket)
            self.assertEqual(await client.health(), {"status": "ok"})
            async with await client.create_sandbox(backend="process") as sb:
                results = await asyncio.gather(
                    sb.exec(["echo", "a"]), sb.exec(["echo", "b"])
                )
                self.assertEqual(sorted(r.stdout for r in results), [b"a\n", b"b\n"])

        asyncio.run(main())


if __name__ == "__main__":
    unittest.main()
