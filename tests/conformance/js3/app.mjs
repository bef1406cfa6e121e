// Fixture app for inngest@3: the shared functions served by this directory's pinned package.
import * as inngest from "inngest";
import { serve } from "inngest/node";
import { startApp } from "../js-common/functions.mjs";

startApp({ inngest, serve, major: 3 });
