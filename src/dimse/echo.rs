//! C-ECHO through the gateway: allowed for any principal whose token is still valid, and relayed
//! to the PACS so that success means the whole path works.

use super::association::{Association, Flow, Misbehaviour, Side};
use crate::audit::Operation;
use crate::dicom::command::{self, Command};
use crate::dicom::message::Event;
use crate::dicom::peer::Incoming;
use crate::policy::Action;

pub async fn handle(s: &mut Association, pc_id: u8, cmd: Command) -> Flow {
    if let Err(d) = s.ctx.policy.decide(&s.caller, Action::Echo).await {
        return s.refuse(pc_id, &cmd, (Operation::Echo, ""), &d).await;
    }
    if let Err(e) = s.pacs.send_message(pc_id, &cmd.encode(), None).await {
        tracing::warn!(assoc = s.id, reason = %e, "cannot relay C-ECHO to the PACS");
        let rsp = cmd.response(command::STATUS_UNABLE_TO_PROCESS, Some("PACS unavailable"));
        s.reply(pc_id, &rsp, None).await;
        return s.abort_both().await;
    }
    match s.pacs_next().await {
        Some(Incoming::Message(Event::Command {
            pc_id: pc,
            command: rsp,
        })) if pc == pc_id && rsp.field == command::C_ECHO_RSP && !rsp.has_data_set() => {
            s.reply(pc_id, &rsp, None).await
        }
        Some(_) => {
            s.protocol_violation(
                Side::Pacs,
                Misbehaviour::UnexpectedMessage,
                Some(Operation::Echo),
            )
            .await
        }
        None => {
            let rsp = cmd.response(
                command::STATUS_UNABLE_TO_PROCESS,
                Some("PACS did not answer"),
            );
            s.reply(pc_id, &rsp, None).await;
            s.abort_both().await
        }
    }
}
