"""OHIF's prebuilt static site (npm @ohif/app's dist/, fetched into .cache/ by scripts/setup.sh)
served on a loopback port with an app-config.js of the gateway's: its DICOMweb data source is the
gateway's, and a small extension in the config sets the bearer token on every DICOMweb request
(OHIF 3.13's data source takes its headers from userAuthenticationService only). Used by the
browser tests and by scripts/demo.sh (`python ohif_site.py PORT GATEWAY_URL TOKEN`)."""

import json
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OHIF = Path(__file__).resolve().parents[2] / ".cache" / "ohif-3.13.2" / "dist"

APP_CONFIG = """window.config = {
  routerBasename: '/',
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  investigationalUseDialog: { option: 'never' },
  // The bearer for every DICOMweb request: OHIF 3.13's data source takes its headers from
  // userAuthenticationService only.
  extensions: [{
    id: 'pacsgate-bearer',
    preRegistration: ({ servicesManager }) => {
      servicesManager.services.userAuthenticationService.setServiceImplementation({
        getAuthorizationHeader: () => ({ Authorization: 'Bearer ' + %(token)s }),
      });
    },
  }],
  modes: [],
  defaultDataSourceName: 'pacsgate',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'pacsgate',
    configuration: {
      friendlyName: 'pacsgate',
      name: 'pacsgate',
      qidoRoot: %(web)s,
      wadoRoot: %(web)s,
      wadoUriRoot: %(wado)s,
      qidoSupportsIncludeField: true,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


class OhifSite:
    """OHIF's static site on a loopback port, its app-config.js set by `configure`."""

    def __init__(self, port):
        if not (OHIF / "index.html").exists():
            raise RuntimeError(f"{OHIF} is missing: run scripts/setup.sh (it fetches OHIF)")
        self.config = b""
        site = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/app-config.js":
                    body = site.config
                    self.send_response(200)
                    self.send_header("Content-Type", "application/javascript")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    self.wfile.write(body)
                    return
                # The app's own routes (/viewer, /) are its index page.
                if not (OHIF / path.lstrip("/")).is_file():
                    self.path = "/index.html"
                super().do_GET()

        self.port = port
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), partial(Handler, directory=str(OHIF)))
        self.origin = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def configure(self, gateway, token):
        self.configure_url(gateway.public_url, token)

    def configure_url(self, public_url, token):
        self.config = (APP_CONFIG % {"token": json.dumps(token), "web": json.dumps(f"{public_url}/dicom-web"),
                                     "wado": json.dumps(f"{public_url}/wado")}).encode()

    def stop(self):
        self.server.shutdown()




if __name__ == "__main__":
    port, public_url, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    site = OhifSite(port)
    site.configure_url(public_url, token)
    print(f"OHIF on {site.origin}", flush=True)
    threading.Event().wait()
