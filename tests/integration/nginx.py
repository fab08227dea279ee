"""nginx on loopback as a plain reverse proxy in front of 127.0.0.1:upstream_port (HTTP), for
the tests (a TLS terminator in front of Orthanc's DICOMweb, as hospitals deploy one) and the
benchmarks (the relay the gateway is compared with): no authentication, proxy_buffering off,
HTTP/1.1 keep-alive upstream, one access log line per request. With `tls` (certificate and key
files) it serves HTTPS, and with `client_ca` it requires a client certificate that CA signed.
"""

import shutil
import subprocess
from pathlib import Path

from conftest import free_port, wait_tcp


class Nginx:
    def __init__(self, tmp: Path, upstream_port: int, name="nginx", tls=None, client_ca=None):
        if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
            raise RuntimeError("nginx is not installed (scripts/setup.sh installs it)")
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        d = tmp / name
        d.mkdir()
        self.dir = d
        temps = "\n".join(f"    {k}_temp_path {d / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        listen = f"listen 127.0.0.1:{self.port}"
        if tls:
            listen += f" ssl;\n        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n" \
                      "        ssl_protocols TLSv1.2 TLSv1.3"
            if client_ca:
                listen += f";\n        ssl_client_certificate {client_ca};\n        ssl_verify_client on"
        cfg = d / "nginx.conf"
        cfg.write_text(
            f"""worker_processes auto;
daemon off;
pid {d / 'nginx.pid'};
error_log {d / 'error.log'} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d / 'access.log'};
{temps}
    upstream origin {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    server {{
        {listen};
        keepalive_requests 100000;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""
        )
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        self.log = open(d / "nginx.out", "w")
        self.proc = subprocess.Popen([exe, "-p", str(d), "-e", str(d / "error.log"), "-c", str(cfg)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_tcp(self.port, self.proc, "nginx")

    def access_log(self) -> str:
        p = self.dir / "access.log"
        return p.read_text() if p.exists() else ""
